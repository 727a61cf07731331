"""Configuration mistakes: each is one error naming the file it is in (local.toml or the tracked
file), the table and the key, with the known keys or the expected type as the hint."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kseries import build, send, series, tree
from kseries.changelog import Changelog
from kseries.check import Gate
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.paths import PROJECT
from kseries.testbox import suite
from kseries.testbox.box import TestboxConfig
from tests.conftest import Project

TOOLKIT = """
[tree]
path = ""

[default_tree]
package = "linux-source-7.2"

[build]
fragments = ["kvm-testbox"]
jobs = 2
ccache = true

[build.targets.bzImage]
goals = ["bzImage"]
artifact = "arch/x86/boot/bzImage"

[[check.gate]]
name = "g"
base_config = "defconfig"
fragments = ["kvm-modules"]
target = "kvm-W1"

[send]
to = ["maint"]
get_maintainer = true

[send.checkpatch_ignore]
FILE_PATH_CHANGES = "new files"

[send.smtp]
server = ""
port = 587
"""

TESTBOXES = """
[testbox]
default = "q"
dmesg_ignore = []

[box.q]
method = "qemu"
qemu = { cpu = "max", smp = 1 }
timeouts = { connect = 10, boot = 120 }

[box.lab]
method = "kexec"
host = "lab"
port = 22
identity = "id"
known_hosts = "kh"

[recipe.r]
command = "make"
output = "{out}/x"

[[test]]
name = "smoke"
command = "true"
timeout = 30
soak = { per_cycle = 0.1 }
"""


def read_series(config: Config) -> Any:
    return series.load(config)


def read_tree(config: Config) -> Any:
    return tree.open_tree(config, str(PROJECT))


def read_build(config: Config) -> Any:
    return build.build(config, tree="/nonexistent", log=lambda _: None)


def read_gates(config: Config) -> Any:
    return Gate.load_all(config)


def read_send(config: Config) -> Any:
    return send.SendSettings(config, series.load(config))


def read_boxes(config: Config) -> Any:
    settings = TestboxConfig.load(config)
    return settings.settings(), settings.box("q"), suite.load_tests(settings)


Reader = Callable[[Config], Any]


@pytest.fixture
def configs(project: Project) -> Path:
    """The scratch project's configs/ with every tracked file the readers use."""
    (project.configs / "toolkit.toml").write_text(TOOLKIT)
    (project.configs / "testboxes.toml").write_text(TESTBOXES)
    (project.configs / "kvm-testbox.config").write_text("CONFIG_KVM=y\n")
    (project.configs / "kvm-modules.config").write_text("CONFIG_KVM=m\n")
    return project.configs


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def refused(configs: Path, read: Reader) -> ToolkitError:
    with pytest.raises(ToolkitError) as caught:
        read(Config.load(configs))
    assert "\n" not in caught.value.message
    return caught.value


def test_the_scratch_configs_are_valid(configs: Path) -> None:
    config = Config.load(configs)
    for read in (read_series, read_tree, read_gates, read_send, read_boxes):
        read(config)


# (file, old text, new text, the reader, table, key); the key is unknown in that table
UNKNOWN_KEYS = [
    ("series.toml", 'author = "author"', 'author = "author"\nreviewd_by = ["maint"]',
     read_series, "[[patch]] #1", "reviewd_by"),
    ("series.toml", 'author = "author"', 'author = "author"\nlink = "https://x.org"',
     read_series, "[[patch]] #1", "link"),
    ("series.toml", 'author = "sub"', 'author = "sub"\nco_developer = ["author"]',
     read_series, "[[patch]] #2", "co_developer"),
    ("series.toml", 'version = 2', 'version = 2\nv1_link = "https://x.org"',
     read_series, "[series]", "v1_link"),
    ("series.toml", 'branch = "next"', 'branch = "next"\nbrnach = "next"',
     read_series, "[base]", "brnach"),
    ("series.toml", 'name = "Ann Author"', 'name = "Ann Author"\nmail = "a@b.org"',
     read_series, "[people.author]", "mail"),
    ("toolkit.toml", 'to = ["maint"]', 'to = ["maint"]\nccc = ["a@b.org"]',
     read_send, "[send]", "ccc"),
    ("toolkit.toml", 'port = 587', 'port = 587\npassword = "x"',
     read_send, "[send.smtp]", "password"),
    ("toolkit.toml", 'path = ""', 'paht = "~/src/linux"', read_tree, "[tree]", "paht"),
    ("toolkit.toml", 'package = "linux-source-7.2"', 'pakage = "linux-source-7.2"',
     read_tree, "[default_tree]", "pakage"),
    ("toolkit.toml", "jobs = 2", "jobs = 2\njob = 4", read_build, "[build]", "job"),
    ("toolkit.toml", 'goals = ["bzImage"]', 'goals = ["bzImage"]\ngaols = []',
     read_build, "[build.targets.bzImage]", "gaols"),
    ("toolkit.toml", 'target = "kvm-W1"', 'target = "kvm-W1"\ntargte = "x"',
     read_gates, "[[check.gate]] #1", "targte"),
    ("toolkit.toml", "[[check.gate]]", "[check]\ngates = 1\n[[check.gate]]",
     read_gates, "[check]", "gates"),
    ("testboxes.toml", 'default = "q"', 'default = "q"\ndefualt = "q"',
     read_boxes, "[testbox]", "defualt"),
    ("testboxes.toml", 'method = "qemu"', 'method = "qemu"\nhots = "h"',
     read_boxes, "[box.q]", "hots"),
    ("testboxes.toml", "smp = 1", "smp = 1, mem = \"1G\"", read_boxes, "[box.q.qemu]", "mem"),
    ("testboxes.toml", "boot = 120", "boot = 120, shutdown = 5",
     read_boxes, "[box.q.timeouts]", "shutdown"),
    ("testboxes.toml", 'output = "{out}/x"', 'output = "{out}/x"\nheader = true',
     read_boxes, "[recipe.r]", "header"),
    ("testboxes.toml", "timeout = 30", "timeout = 30\ntimout = 3",
     read_boxes, "[[test]] #1", "timout"),
    ("testboxes.toml", "per_cycle = 0.1", "per_cycle = 0.1, cycles = 3",
     read_boxes, "[[test]] #1 soak", "cycles"),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, old, new, read, table, key", UNKNOWN_KEYS, ids=[c[5] for c in UNKNOWN_KEYS]
)
def test_an_unknown_key_names_file_table_and_key(
    configs: Path, name: str, old: str, new: str, read: Reader, table: str, key: str
) -> None:
    edit(configs / name, old, new)
    error = refused(configs, read)
    assert error.message == f"{configs / name} {table}: unknown setting {key}"
    assert error.hint.startswith("known settings: ")


def test_an_unknown_top_level_table(configs: Path) -> None:
    with (configs / "toolkit.toml").open("a") as f:
        f.write('\n[sned]\nto = ["maint"]\n')
    with pytest.raises(ToolkitError) as caught:
        Config.load(configs)
    assert caught.value.message == f"{configs / 'toolkit.toml'}: unknown table [sned]"
    assert caught.value.hint == (
        "tables in toolkit.toml: tree, default_tree, build, check, send, review"
    )


def test_a_test_box_table_outside_testboxes_toml_is_refused(configs: Path) -> None:
    (configs / "series.toml").write_text((configs / "series.toml").read_text() + "[box.x]\n")
    with pytest.raises(ToolkitError, match=r"series.toml: unknown table \[box\]"):
        Config.load(configs)
    edit(configs / "series.toml", "[box.x]\n", "")
    edit(configs / "testboxes.toml", "[testbox]", "[send]\n[testbox]")
    with pytest.raises(ToolkitError, match=r"testboxes.toml: unknown table \[send\]"):
        TestboxConfig.load(Config.load(configs))


# (file, old text, new text, the reader, table, key, what was expected, what was found)
WRONG_TYPES = [
    ("toolkit.toml", "get_maintainer = true", 'get_maintainer = "no"', read_send,
     "[send]", "get_maintainer", "true or false", "the string 'no'"),
    ("toolkit.toml", "ccache = true", "ccache = 0", read_build,
     "[build]", "ccache", "true or false", "the integer 0"),
    ("series.toml", 'co_developers = ["sub"]', 'co_developers = "sub"', read_series,
     "[[patch]] #1", "co_developers", "a list of strings", "the string 'sub'"),
    ("series.toml", 'links = ["https://lore.kernel.org/all/abc@example.org"]',
     'links = "https://lore.kernel.org/all/abc@example.org"', read_series, "[[patch]] #1",
     "links", "a list of strings",
     "the string 'https://lore.kernel.org/all/abc@example.org'"),
    ("toolkit.toml", 'to = ["maint"]', 'to = "maint"', read_send,
     "[send]", "to", "a list of strings", "the string 'maint'"),
    ("toolkit.toml", 'fragments = ["kvm-testbox"]', "fragments = [1]", read_build,
     "[build]", "fragments", "a list of strings", "an array"),
    ("testboxes.toml", "port = 22", 'port = "twentytwo"', read_boxes,
     "[box.lab]", "port", "an integer", "the string 'twentytwo'"),
    ("testboxes.toml", "boot = 120", 'boot = "2m"', read_boxes,
     "[box.q.timeouts]", "boot", "a number", "the string '2m'"),
    ("testboxes.toml", "smp = 1", "smp = 1.5", read_boxes,
     "[box.q.qemu]", "smp", "an integer", "the float 1.5"),
    ("toolkit.toml", "jobs = 2", "jobs = true", read_build,
     "[build]", "jobs", "an integer", "the boolean true"),
    ("testboxes.toml", "port = 22", "port = false", read_boxes,
     "[box.lab]", "port", "an integer", "the boolean false"),
    ("series.toml", 'date = "Fri, 9 Aug 2024 20:51:58 +0000"', 'date = "last Friday"',
     read_series, "[[patch]] #1", "date", "an RFC 2822 date", "the string 'last Friday'"),
    ("series.toml", 'date = "Fri, 9 Aug 2024 20:51:58 +0000"', "date = 2024-08-09",
     read_series, "[[patch]] #1", "date", "an RFC 2822 date", "a date"),
    ("series.toml", "version = 2", "version = true", read_series,
     "[series]", "version", "a positive integer", "the boolean true"),
    ("toolkit.toml", 'FILE_PATH_CHANGES = "new files"', "FILE_PATH_CHANGES = true", read_send,
     "[send.checkpatch_ignore]", "FILE_PATH_CHANGES", "a string", "the boolean true"),
    ("toolkit.toml", "port = 587", "port = 5.87", read_send,
     "[send.smtp]", "port", "a port number or name", "the float 5.87"),
    ("testboxes.toml", 'dmesg_ignore = []', 'dmesg_ignore = "taint"', read_boxes,
     "[testbox]", "dmesg_ignore", "a list of strings", "the string 'taint'"),
    ("testboxes.toml", 'qemu = { cpu = "max", smp = 1 }', 'qemu = "max"', read_boxes,
     "[box.q]", "qemu", "a table", "the string 'max'"),
    ("testboxes.toml", "timeout = 30", 'timeout = "30s"', read_boxes,
     "[[test]] #1", "timeout", "a number", "the string '30s'"),
    ("series.toml", 'name = "Ann Author"', "name = 7", read_series,
     "[people.author]", "name", "a string", "the integer 7"),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, old, new, read, table, key, expected, found",
    WRONG_TYPES,
    ids=[f"{c[5]}={c[2].split('=', 1)[1].strip()}" for c in WRONG_TYPES],
)
def test_a_value_of_the_wrong_type_names_the_setting_and_both_types(
    configs: Path,
    name: str,
    old: str,
    new: str,
    read: Reader,
    table: str,
    key: str,
    expected: str,
    found: str,
) -> None:
    edit(configs / name, old, new)
    error = refused(configs, read)
    assert error.message == f"{configs / name} {table}: {key} must be {expected}, not {found}"
    assert error.hint.startswith(f"write it as {key} = ")


# (local.toml, the reader, the error after the file's name)
FROM_LOCAL = [
    ('[[patch]]\ndiff = "0001.diff"\ntemplate = "0001.j2"\nauthor = "author"\n'
     'reviewd_by = ["maint"]\n', read_series, " [[patch]] #1: unknown setting reviewd_by"),
    ("[series]\nversion = 0\n", read_series,
     " [series]: version must be a positive integer, not the integer 0"),
    ('[send]\nccc = ["a@b.org"]\n', read_send, " [send]: unknown setting ccc"),
    ('[box.lab]\nport = "twentytwo"\n', read_boxes,  # the rest of [box.lab] is tracked
     " [box.lab]: port must be an integer, not the string 'twentytwo'"),
    ("[sned]\n", lambda config: config, ": unknown table [sned]"),  # Config.load refuses it
]  # fmt: skip


@pytest.mark.parametrize("text, read, error", FROM_LOCAL, ids=[c[2] for c in FROM_LOCAL])
def test_a_key_from_local_toml_names_local_toml(
    configs: Path, text: str, read: Reader, error: str
) -> None:
    (configs / "local.toml").write_text(text)
    assert refused(configs, read).message == f"{configs / 'local.toml'}{error}"


def test_a_key_in_the_tracked_file_is_not_blamed_on_local_toml(configs: Path) -> None:
    (configs / "local.toml").write_text("[box.lab]\nport = 2222\n")
    edit(configs / "testboxes.toml", 'host = "lab"', 'host = "lab"\nhots = "lab"')
    assert refused(configs, read_boxes).message == (
        f"{configs / 'testboxes.toml'} [box.lab]: unknown setting hots"
    )


def test_a_file_that_is_not_utf8_names_the_byte_offset(project: Project) -> None:
    configs = project.configs
    text = b'[default_tree]\npackage = "linux-source-7.2"\n'
    offset = text.index(b"linux-source")
    (configs / "toolkit.toml").write_bytes(text[:offset] + b"\xe9" + text[offset + 1 :])
    with pytest.raises(ToolkitError) as caught:
        Config.load(configs)
    assert caught.value.message == (
        f"{configs / 'toolkit.toml'}: not UTF-8: byte 0xe9 at offset {offset}"
    )
    (configs / "toolkit.toml").write_bytes(text)
    (configs / "local.toml").write_bytes(b'[tree]\npath = "\xff"\n')
    with pytest.raises(ToolkitError) as caught:
        Config.load(configs)
    assert caught.value.message == f"{configs / 'local.toml'}: not UTF-8: byte 0xff at offset 15"
    assert caught.value.hint == "save the file as UTF-8"


def test_series_facts_reach_the_templates(project: Project) -> None:
    edit(
        project.configs / "series.toml", "[base]", '[series.facts]\nv1_link = "https://v1"\n[base]'
    )
    (project.root / "templates" / "cover.j2").write_text(
        "demo: The cover\n\nv1: {{ series.facts.v1_link }}\n"
    )
    loaded = project.series()
    assert loaded.facts == {"v1_link": "https://v1"}
    assert "v1: https://v1" in Changelog(loaded).cover_letter().body


def test_a_task_prints_one_error_line_and_exits_1(configs: Path) -> None:
    edit(configs / "series.toml", 'author = "author"', 'author = "author"\nreviewd_by = ["maint"]')
    done = subprocess.run(
        [str(PROJECT / ".venv/bin/invoke"), "changelog"],
        cwd=PROJECT,
        env={**os.environ, "KSERIES_CONFIG_DIR": str(configs)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: {configs / 'series.toml'} [[patch]] #1: unknown setting reviewd_by",
        "hint: known settings: diff, template, author, date, co_developers, suggested_by, "
        "reported_by, acked_by, reviewed_by, tested_by, links, extra_trailers",
    ]
