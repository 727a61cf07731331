"""A test's "series:NAME[@N]" files: another series built by the build stage at its branch's
tip, or after its first N patches (the pair test's patched and stock QEMU), in a worktree of
its own tree. Real git, the real build stage of the meson kind and a real ninja; the tree is
a tiny meson-kind project whose `configure` writes build.ninja itself (QEMU's real configure
and build take 10 minutes: tests/test_qemu_series.py has that one, opt-in)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.paths import PROJECT, compare_dir
from kseries.testbox.box import parse_box
from kseries.testbox.remote import SeriesBuilder

CONFIGURE = """\
#!/bin/sh
# what QEMU's configure leaves in its build directory: build.ninja and config-host.mak; the
# compiler is its --cc, word by word, as QEMU's puts it in meson's native file
src=$(cd "$(dirname "$0")" && pwd)
cc=cc
for arg; do case $arg in --cc=*) cc=${arg#--cc=};; esac; done
cat > build.ninja <<NINJA
rule cc
  command = $cc -c \\$in -o \\$out
  description = Compiling C object \\$out
rule copy
  command = cp \\$in \\$out
  description = Linking target \\$out
build unit.o: cc $src/unit.c
build prog: copy $src/prog.txt | unit.o
NINJA
echo "CONFIG=1" > config-host.mak
"""


def git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "-c", "user.name=T", "-c", "user.email=t@example.org", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """configs/ (the kernel series) plus configs/demo/: a two-patch meson-kind series whose
    branch demo-v1 is in a tree of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "configure").write_text(CONFIGURE)
    (tree / "configure").chmod(0o755)
    (tree / "meson.build").write_text("project('demo')\n")
    (tree / "VERSION").write_text("1.0\n")
    (tree / "prog.txt").write_text("stock\n")
    (tree / "unit.c").write_text("int unit(void) { return 1; }\n")
    git(tree, "init", "-q", "-b", "master")
    git(tree, "add", ".")
    git(tree, "commit", "-qm", "base")
    git(tree, "checkout", "-qb", "demo-v1")
    for text in ("stock, fixed build\n", "patched\n"):
        (tree / "prog.txt").write_text(text)
        git(tree, "commit", "-qam", text.strip())
    git(tree, "checkout", "-q", "master")  # the user's checkout: never moved by a test run
    shutil.copytree(
        PROJECT / "configs",
        tmp_path / "configs",
        ignore=shutil.ignore_patterns("qemu", "local.toml"),
    )
    for name in ("templates", "patches"):
        (tmp_path / name / "demo").mkdir(parents=True)
    for n in (1, 2):  # the branch's commits as the series' diffs
        diff = git(tree, "diff", f"demo-v1~{2 - n + 1}", f"demo-v1~{2 - n}") + "\n"
        (tmp_path / "patches" / "demo" / f"{n}.diff").write_text(diff)
        (tmp_path / "templates" / "demo" / f"{n}.j2").write_text(f"demo: patch {n}\n")
    (tmp_path / "configs" / "demo").mkdir()
    (tmp_path / "configs" / "demo" / "series.toml").write_text(
        textwrap.dedent("""\
            [series]
            name = "demo"
            version = 1
            submitter = "t"
            cover_template = "cover.j2"
            [base]
            remote = "origin"
            url = "https://example.org/demo.git"
            branch = "master"
            [people.t]
            name = "T"
            email = "t@example.org"
            """)
        + "".join(
            f'[[patch]]\ndiff = "{n}.diff"\ntemplate = "{n}.j2"\nauthor = "t"\n' for n in (1, 2)
        )
    )
    (tmp_path / "configs" / "demo" / "toolkit.toml").write_text(
        textwrap.dedent(f"""\
            [tree]
            path = "{tree}"
            [build]
            kind = "meson"
            target = "prog"
            [build.meson]
            configure = []
            [build.targets.prog]
            goals = ["prog"]
            artifact = "prog"
            """)
    )
    return Config.load(tmp_path / "configs")


def test_a_series_is_built_at_its_tip_or_after_n_patches(demo: Config) -> None:
    logged: list[str] = []
    build = SeriesBuilder(demo, logged.append)
    assert build("demo", None).read_text() == "patched\n"
    tree = demo.project / "tree"
    if shutil.which("ccache"):  # the meson kind compiles through ccache too (configure's --cc)
        # one build directory per series of the tree (two series may share it)
        built = compare_dir(tree) / "build" / "tree-demo" / "kseries" / "manifest-prog.json"
        ccache = json.loads(built.read_text())["ccache"]
        assert ccache and ccache["hits"] + ccache["misses"] == 1
    assert build("demo", 1).read_text() == "stock, fixed build\n"
    assert build("demo", 2).read_text() == "patched\n"
    assert build("demo", None) == build("demo", None)  # once a run
    assert git(tree, "rev-parse", "--abbrev-ref", "HEAD") == "master"  # the user's checkout
    assert sum("compare: building series demo" in line for line in logged) == 3
    with pytest.raises(ToolkitError, match="series:demo@3: the series has 2 patches"):
        build("demo", 3)
    tip = git(tree, "rev-parse", "demo-v1")
    # @2 of 2 is the tip: one build, named as the whole series
    assert [(b.series, b.branch, b.patches) for b in build.builds] == [
        ("demo", "demo-v1", None),
        ("demo", "demo-v1", 1),
    ]
    assert build.builds[0].commit == tip
    assert build.builds[1].commit == git(tree, "rev-parse", "demo-v1~1")
    assert build.builds[0].to_json()["sha256"] == hashlib.sha256(b"patched\n").hexdigest()


def test_a_box_runs_the_qemu_a_series_builds(demo: Config, tmp_path: Path) -> None:
    """qemu.binary = "series:demo": the box runs that series built at its tip, with the
    build's firmware directory first on QEMU's -L path; any other box is left as it is."""
    rom = tmp_path / "bios.bin"
    rom.write_bytes(b"rom")
    toolkit = demo.configs / "demo" / "toolkit.toml"
    toolkit.write_text(
        toolkit.read_text().replace("configure = []", f'configure = []\nfirmware = ["{rom}"]')
    )
    table = {"qemu": {"binary": "series:demo", "extra_args": ["-device", "edu"]}}
    box = parse_box("pair", table, demo.configs, "[box.pair]")
    build = SeriesBuilder(demo, lambda _: None)
    built = build.box(box)
    assert built.qemu is not None and Path(built.qemu.binary).read_text() == "patched\n"
    assert built.qemu.extra_args[:2] == ("-L", str(Path(built.qemu.binary).parent / "firmware"))
    assert built.qemu.extra_args[2:] == ("-device", "edu")
    assert (Path(built.qemu.extra_args[1]) / "bios.bin").read_bytes() == b"rom"
    assert [(b.series, b.patches) for b in build.builds] == [("demo", None)]
    plain = parse_box("local", {"qemu": {}}, demo.configs, "[box.local]")
    assert build.box(plain) is plain


def test_a_series_not_rebased_yet_says_how(demo: Config) -> None:
    tree = demo.project / "tree"
    git(tree, "branch", "-qD", "demo-v1")
    with pytest.raises(ToolkitError, match="demo-v1 is not a file and not a commit") as caught:
        SeriesBuilder(demo, lambda _: None)("demo", None)
    assert caught.value.hint == "run `invoke rebase --series demo`"
