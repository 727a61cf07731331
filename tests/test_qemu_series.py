"""The QEMU series (configs/qemu): its tables, the source-package default tree, the meson
build kind's configure and ninja runs, and (slow) the real QEMU tree rebased and mailed.

The fast tests use real dpkg-source, git and ninja on small inputs; the slow one needs the
Debian qemu source package (about 40 MB, a minute); the static build is opt-in
(KSERIES_QEMU_BUILD_TEST=1: ten minutes to most of an hour cold)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from kseries import series as series_stage
from kseries.build.make import MakeRun
from kseries.build.meson import MesonConfig
from kseries.build.orchestrate import BUILD
from kseries.build.toolchain import Target
from kseries.changelog import Changelog
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.paths import PROJECT
from kseries.send import SendSettings
from kseries.tree import DEFAULT_TREE, prepare_default_tree


def qemu_config() -> Config:
    return Config.load(PROJECT / "configs", "qemu")


def scratch(
    tmp_path: Path, toolkit_extra: str = "", series_edit: tuple[str, str] = ("", "")
) -> Config:
    """configs/ (with qemu/), templates/ and patches/ copied; configs/qemu's files edited."""
    for name in ("configs", "templates", "patches"):
        shutil.copytree(
            PROJECT / name, tmp_path / name, ignore=shutil.ignore_patterns("local.toml")
        )
    qemu = tmp_path / "configs" / "qemu"
    (qemu / "toolkit.toml").write_text((qemu / "toolkit.toml").read_text() + toolkit_extra)
    old, new = series_edit
    if old:
        text = (qemu / "series.toml").read_text()
        assert old in text
        (qemu / "series.toml").write_text(text.replace(old, new))
    return Config.load(tmp_path / "configs", "qemu")


# --- the tables ---------------------------------------------------------------------------------


def test_the_qemu_series_loads_from_its_own_directories() -> None:
    series = series_stage.load(qemu_config())
    assert series.branch == "vfio-pci-memory-fault-v1"
    assert (series.base.remote, series.base.url, series.base.branch) == (
        "qemu",
        "https://gitlab.com/qemu-project/qemu.git",
        "master",
    )
    assert series.patches_dir == PROJECT / "patches" / "qemu"
    assert series.templates_dir == PROJECT / "templates" / "qemu"
    assert [p.diff.name[:4] for p in series.patches] == [f"{n:04}" for n in range(1, 7)]
    assert series.companions == ("kvm-x86-mmu-memory-fault",)
    messages = Changelog(series).messages()
    assert [m.subject.split(": ", 1)[0] for m in messages] == [
        "hw/cxl",
        "vfio/pci",
        "accel/kvm",
        "vfio/pci",
        "vfio/pci",
        "system/memory",
    ]
    for message in messages:  # QEMU's rule is the kernel's: the submitter signs off last
        assert str(message.trailers[-1]) == (
            "Signed-off-by: Mikhail Malyshev <mike.malyshev@gmail.com>"
        )


def test_each_cover_letter_links_the_other_series() -> None:
    kernel = series_stage.load(Config.load(PROJECT / "configs"))
    qemu = series_stage.load(qemu_config())
    kernel_cover = Changelog(kernel).cover_letter()
    qemu_cover = Changelog(qemu).cover_letter()
    # neither is sent yet: the link is a lore search for the other's cover subject
    assert f'"{qemu_cover.subject}"' in kernel_cover.body
    assert "https://lore.kernel.org/all/?q=s%3A%22vfio%2Fpci%3A+Emulate+" in kernel_cover.body
    assert f'"{kernel_cover.subject}"' in qemu_cover.body
    assert "https://lore.kernel.org/all/?q=s%3A%22KVM%3A+x86%2Fmmu%3A+" in qemu_cover.body


def test_a_sent_companion_is_linked_by_its_sent_record(tmp_path: Path) -> None:
    config = scratch(tmp_path)
    kernel_review = tmp_path / "configs" / "review.toml"
    record = textwrap.dedent("""\
        [[sent]]
        version = 2
        branch = "kvm-x86-mmu-memory-fault-v2"
        date = "Wed, 02 Dec 2026 06:00:00 +0000"
        base = "a"
        tip = "b"
        tag = "sent/kvm-x86-mmu-memory-fault-v2"
        change_id = "20261201-kvm-x86-mmu-memory-fault-7972adfedb59"
        cover = "cover.1.git.mike@example.org"
        link = "https://lore.kernel.org/all/cover.1.git.mike@example.org/"
        to = ["kvm@vger.kernel.org"]
        cc = []
        patches = ["p1@x", "p2@x", "p3@x"]
        subjects = ["a", "b", "c"]
        patch_ids = ["1", "2", "3"]
        prose = ["x", "y", "z"]
        """)
    kernel_review.write_text(kernel_review.read_text() + record)
    body = Changelog(series_stage.load(config)).cover_letter().body
    assert "https://lore.kernel.org/all/cover.1.git.mike@example.org/" in body
    assert "search for its subject" not in body


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('fetch = "rpm"\n', r"\[default_tree\]: fetch must be deb or source, not the string 'rpm'"),
        ('verison = "1"\n', r"\[default_tree\]: unknown setting verison"),
    ],
)
def test_bad_default_tree_keys_are_one_line(tmp_path: Path, extra: str, message: str) -> None:
    config = scratch(tmp_path)
    toolkit = tmp_path / "configs" / "qemu" / "toolkit.toml"
    text = toolkit.read_text().replace('fetch = "source"', "#")
    toolkit.write_text(text.replace("[default_tree]\n", "[default_tree]\n" + extra))
    with pytest.raises(ToolkitError, match=message) as caught:
        config.reload().table("default_tree", DEFAULT_TREE)
    assert "\n" not in str(caught.value)
    assert "toolkit.toml" in str(caught.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('kind = "meson"', 'kind = "cmake"', r"\[build\]: kind must be kbuild or meson"),
        (
            "[build.meson]\n",
            "[build.meson]\nconfgure = []\n",
            r"\[build.meson\]: unknown setting confgure",
        ),
        (
            "devices = { x86_64",
            'devices = "devices.mak"\n#',
            r"\[build.meson\]: devices must be a table",
        ),
    ],
)
def test_bad_build_keys_are_one_line(tmp_path: Path, old: str, new: str, message: str) -> None:
    config = scratch(tmp_path)
    toolkit = tmp_path / "configs" / "qemu" / "toolkit.toml"
    text = toolkit.read_text()
    assert old in text
    toolkit.write_text(text.replace(old, new, 1))
    with pytest.raises(ToolkitError, match=message) as caught:
        config.reload().table("build", BUILD)
    assert "\n" not in str(caught.value)


def test_a_missing_firmware_file_is_refused_before_any_work(tmp_path: Path) -> None:
    table = {"configure": [], "firmware": [str(tmp_path / "bios.bin")]}
    with pytest.raises(ToolkitError, match=r"\[build.meson\] firmware: .*bios.bin does not exist"):
        MesonConfig.resolve(table, tmp_path)


def test_checkpatch_options_are_data(tmp_path: Path) -> None:
    config = qemu_config()
    settings = SendSettings(config, series_stage.load(config))
    assert (settings.checkpatch_options, settings.checkpatch_types) == ([], False)
    kernel = Config.load(PROJECT / "configs")
    settings = SendSettings(kernel, series_stage.load(kernel))
    assert (settings.checkpatch_options, settings.checkpatch_types) == (["--strict"], True)
    config = scratch(tmp_path, '\n[send.checkpatch_ignore]\nSPACING = "why"\n')
    with pytest.raises(
        ToolkitError, match=r"checkpatch_ignore needs a checkpatch\.pl with --ignore"
    ):
        SendSettings(config, series_stage.load(config))


def test_companions_must_be_a_list(tmp_path: Path) -> None:
    config = scratch(tmp_path, series_edit=("companions = [", "companions = 'x' #["))
    with pytest.raises(ToolkitError, match=r"\[series\]: companions must be a list"):
        series_stage.load(config)


# --- the meson build kind -----------------------------------------------------------------------


def test_configure_names_the_device_list_as_configure_wants_it(tmp_path: Path) -> None:
    devices = tmp_path / "configs" / "devices.mak"
    devices.parent.mkdir()
    devices.write_text("CONFIG_I440FX=y\n")
    tree = tmp_path / "tree"
    meson = MesonConfig.resolve(
        {"configure": ["--static"], "devices": {"x86_64": "devices.mak"}}, devices.parent
    )
    command = meson.command(tree)
    assert command[0] == str(tree / "configure")
    assert command[1].startswith("--python=") and command[2] == "--static"
    # relative to the tree's configs/devices/x86_64-softmmu/, without .mak
    assert command[3] == "--with-devices-x86_64=../../../../configs/devices"
    before = meson.digest()
    devices.write_text("CONFIG_I440FX=y\nCONFIG_VFIO_PCI=y\n")
    assert meson.digest() != before  # a changed device list configures again


def test_ninja_progress_is_exact_and_its_failure_is_one_error(tmp_path: Path) -> None:
    """A real ninja on a three-step build.ninja: the steps and the total from its [N/M]."""
    tree, build = tmp_path / "tree", tmp_path / "build"
    tree.mkdir()
    build.mkdir()
    (build / "build.ninja").write_text(
        textwrap.dedent("""\
            rule cc
              command = cp $in $out
              description = Compiling C object $out
            rule fail
              command = sh ../tree/fail.sh
              description = Linking target $out
            build a.o: cc ../tree/a.c
            build b.o: cc ../tree/a.c
            build all: phony a.o b.o
            build broken: fail a.o
            """)
    )
    (tree / "a.c").write_text("int a;\n")
    (tree / "fail.sh").write_text(
        "echo '../tree/hw/vfio/pci.c:12:3: error: unknown type foo'\nexit 1\n"
    )
    with (build / "log").open("w") as log:
        outcome = MakeRun(
            tree, build, Target("all", ("all",)), jobs=1, log_file=log, tool="ninja"
        ).run()
    assert sorted(outcome.steps) == [("Compiling C object", "a.o"), ("Compiling C object", "b.o")]
    with (build / "log").open("w") as log:
        runner = MakeRun(
            tree, build, Target("broken", ("broken",)), jobs=1, log_file=log, tool="ninja"
        )
        with pytest.raises(ToolkitError, match=r"compile error at hw/vfio/pci.c:12") as caught:
            runner.run()
    assert "ninja exited 1" in caught.value.hint
    assert runner.expected == 1


# --- the source-package default tree, offline -------------------------------------------------


def make_source_package(where: Path) -> Path:
    """A tiny 3.0 (quilt) source package, `demo`, with one Debian patch, built by dpkg-source."""
    work = where / "demo-1.0"
    (work / "debian/patches").mkdir(parents=True)
    (work / "Makefile").write_text("all:\n")
    (work / "main.c").write_text("int main(void) { return 0; }\n")
    (work / ".gitignore").write_text("*.patch\n")
    subprocess.run(
        ["tar", "-cJf", str(where / "demo_1.0.orig.tar.xz"), "-C", str(where), "demo-1.0"],
        check=True,
    )
    (work / "debian/changelog").write_text(
        "demo (1.0-1) unstable; urgency=medium\n\n  * Test.\n\n"
        " -- Test <test@example.org>  Thu, 01 Jan 2026 00:00:00 +0000\n"
    )
    (work / "debian/control").write_text(
        "Source: demo\nMaintainer: Test <test@example.org>\n\n"
        "Package: demo\nArchitecture: all\nDescription: demo\n"
    )
    (work / "debian/source").mkdir()
    (work / "debian/source/format").write_text("3.0 (quilt)\n")
    (work / "debian/patches/offline.patch").write_text(
        textwrap.dedent("""\
            --- a/main.c
            +++ b/main.c
            @@ -1 +1 @@
            -int main(void) { return 0; }
            +int main(void) { return 1; }
            """)
    )
    (work / "debian/patches/series").write_text("offline.patch\n")
    subprocess.run(["dpkg-source", "-b", "demo-1.0"], cwd=where, check=True, capture_output=True)
    return where / "demo_1.0-1.dsc"


def test_a_source_package_is_imported_with_debian_patches_applied(tmp_path: Path) -> None:
    root = tmp_path / "default-tree-demo"
    made = tmp_path / "made"
    made.mkdir()
    make_source_package(made)
    # what a finished download leaves: root/source with the .dsc and its tarballs
    (root / "source").mkdir(parents=True)
    for path in made.glob("demo_*"):
        shutil.copy(path, root / "source")
    (root / ".demo.partial").mkdir()  # an interrupted unpack
    options = {"package": "demo", "fetch": "source", "version": "1.0-1", "root": root}

    tree = prepare_default_tree(**options, remote="qemu", branch="master", log=lambda _: None)

    work = WorkTree(tree.path)
    assert tree.path == (root / "demo").resolve()
    assert not (root / ".demo.partial").exists()
    assert (tree.path / "main.c").read_text() == "int main(void) { return 1; }\n"  # patched
    assert not (tree.path / ".pc").exists()  # quilt's state is not source
    files = work.git("ls-files").split()
    assert "debian/patches/offline.patch" in files  # .gitignore's *.patch does not drop it
    assert work.git("log", "-1", "--format=%an|%ad|%s", "--date=raw").strip() == (
        "kseries default tree|1767225600 +0000|"
        "Debian source package demo 1.0-1, Debian's patches applied"
    )
    assert work.git("rev-parse", "refs/remotes/qemu/master").strip() == tree.base_commit
    bare = Path(tree.remote_url)
    assert subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)"], cwd=bare, capture_output=True, text=True
    ).stdout.split() == ["refs/heads/master"]
    again = prepare_default_tree(**options, remote="qemu", branch="master", log=print)
    assert again == tree


# --- the real QEMU tree -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qemu_tree(tmp_path_factory: pytest.TempPathFactory) -> WorkTree:
    """A clone of the default QEMU tree (Debian's qemu from sid) with the series rebased."""
    from kseries.rebase import Rebase
    from kseries.tree import scratch_clone

    config = qemu_config()
    clone = scratch_clone(tmp_path_factory.mktemp("qemu") / "qemu", remote="qemu", config=config)
    tree = WorkTree(clone)
    Rebase(tree, series_stage.load(config), log=lambda _: None).start(
        remote="qemu", branch="master"
    )
    return tree


@pytest.mark.slow
def test_qemu_series_rebased_and_mailed_through_qemus_checkpatch(
    qemu_tree: WorkTree, tmp_path: Path
) -> None:
    from kseries.send import Mail, Postman

    config = qemu_config()
    series = series_stage.load(config)
    assert (qemu_tree.path / "VERSION").read_text().strip() == "10.2.2"
    subjects = qemu_tree.git("log", "--format=%s", "--reverse", "qemu/master..HEAD").splitlines()
    assert subjects == [m.subject for m in Changelog(series).messages()]
    man = Postman(qemu_tree, series, SendSettings(config, series), testing=False)
    outbox = man.format(tmp_path / "out")
    man.check(outbox, sending=False)
    assert not outbox.failed, outbox.failed
    assert [c.name for c in outbox.checks if c.name.startswith("checkpatch")] == ["checkpatch"]
    for mail in outbox.mails:
        assert "qemu-devel@nongnu.org" in mail.to
    cc = {m.path.name[:4]: m.cc for m in outbox.mails}
    assert any("Alex Williamson" in a for a in cc["0002"])  # VFIO, from get_maintainer.pl
    assert any("Paolo Bonzini" in a for a in cc["0003"])  # KVM
    # the gate is real: trailing whitespace on an added line fails it
    bad = outbox.mails[1].path
    lines = bad.read_text().split("\n")
    added = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("+") and line[1:].strip() and not line.startswith("+++")
    )
    lines[added] += "  "
    bad.write_text("\n".join(lines))
    outbox.mails[1] = Mail.read(bad)  # a mail is read once, when made
    man.check(outbox, sending=False)
    assert [c.name for c in outbox.failed] == ["checkpatch"]


@pytest.mark.slow
def test_the_outer_qemu_is_a_third_series_on_the_same_tree(
    qemu_tree: WorkTree, tmp_path: Path
) -> None:
    """configs/outer-qemu/ is data only: its branch in a clone of the same QEMU tree, its mail
    to qemu-devel and target/i386's maintainers through QEMU's checkpatch, and its build
    directory apart from the QEMU series' (the two are configured differently)."""
    from kseries.paths import build_dir
    from kseries.rebase import Rebase
    from kseries.send import Postman
    from kseries.tree import scratch_clone

    config = Config.load(PROJECT / "configs", "outer-qemu")
    series = series_stage.load(config)
    clone = WorkTree(scratch_clone(tmp_path / "qemu", remote="qemu", config=config))
    Rebase(clone, series, log=lambda _: None).start(remote="qemu", branch="master")
    assert clone.git("log", "--format=%s", "qemu/master..HEAD").splitlines() == [
        "target/i386: Do not deliver an EVENTINJ interrupt twice"
    ]
    man = Postman(clone, series, SendSettings(config, series), testing=False)
    outbox = man.format(tmp_path / "out")
    man.check(outbox, sending=False)
    assert not outbox.failed, outbox.failed
    patch = outbox.mails[-1]
    assert "qemu-devel@nongnu.org" in patch.to
    assert any("Paolo Bonzini" in a for a in patch.cc)  # target/i386, from get_maintainer.pl
    assert any("Richard Henderson" in a for a in patch.cc)
    assert build_dir(clone.path, "outer-qemu") != build_dir(clone.path, "qemu")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("KSERIES_QEMU_BUILD_TEST"),
    reason="cold, the static QEMU build takes 10-40 minutes: KSERIES_QEMU_BUILD_TEST=1",
)
def test_static_qemu_build(qemu_tree: WorkTree, tmp_path: Path) -> None:
    from kseries.build import build

    manifest = build(qemu_config(), tree=str(qemu_tree.path), out=str(tmp_path / "build"))
    assert manifest.image is not None
    binary = Path(manifest.image.path)
    assert manifest.kernelrelease == "QEMU 10.2.2"
    assert manifest.dirty is False
    assert 8 << 20 < binary.stat().st_size < 16 << 20
    elf = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True).stdout
    assert "NEEDED" not in elf  # static: no shared library
    version = subprocess.run(
        [str(binary), "-L", str(tmp_path / "build/firmware"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "QEMU emulator version 10.2.2" in version.stdout
    # no compiler warning (-Werror is on in a git tree); ld's usual ones for a static glibc
    # ("Using 'getpwuid' in statically linked applications requires ...") are not the code's
    warnings = [
        line
        for line in Path(manifest.log).read_text().splitlines()
        if "warning:" in line and "statically linked applications" not in line
    ]
    assert warnings == []
    recorded = json.loads(Path(manifest.path).read_text())
    assert recorded["image"]["sha256"] == manifest.image.sha256


# --- the cover letter's Testing section, from the pair test's report ---------------------------


def pair_report(tree: Path, branch: str, tip: str) -> dict:
    """report.json as test-remote writes it for vfio-bar-race-qemu with --compare: the QEMU
    series built at @1 and at its tip, each kernel's run with the test's cells and metrics
    (TestResult.to_json's, and Run's keys that evidence reads)."""
    cells, metrics = ("stock", "patched", "control"), ("outcome", "toggles", "memfault_exits")

    def run(label: str, commit: str, figures: dict[str, tuple[str, str, str]], status: str):
        values = {
            f"{c}_{m}": v for c, row in figures.items() for m, v in zip(metrics, row, strict=True)
        }
        return {
            "box": "local-pair",
            "label": label,
            "verdict": "pass" if status == "pass" else "fail",
            "kernel": {"commit": commit, "kernelrelease": "7.2.13"},
            "tests": [
                {
                    "name": "vfio-bar-race-qemu",
                    "status": status,
                    "metrics": values,
                    "cells": list(cells),
                    "shown": [f"{c}_{m}" for c in cells for m in metrics],
                }
            ],
            "kvm": {"mmu": "TDP MMU", "cpu": "AMD EPYC", "npt": "Y", "params": {}},
        }

    return {
        "kernel": {"commit": "a" * 40, "branch": "kvm-v2", "tree": "/k", "kernelrelease": "7.2.13"},
        "compare": "kvm-x86/next",
        "boxes": ["local-pair"],
        "tests": ["vfio-bar-race-qemu"],
        "series_builds": [
            {
                "series": "qemu",
                "tree": str(tree),
                "branch": branch,
                "commit": "c" * 40,
                "patches": 1,
                "sha256": "1" * 64,
            },
            {
                "series": "qemu",
                "tree": str(tree),
                "branch": branch,
                "commit": tip,
                "patches": None,
                "sha256": "2" * 64,
            },
        ],
        "runs": [
            run(
                "ref kvm-x86/next",
                "b" * 40,
                {
                    "stock": ("died", "1", "0"),
                    "patched": ("hung", "80", "0"),
                    "control": ("hung", "60", "0"),
                },
                "fail",
            ),
            run(
                "kernel",
                "a" * 40,
                {
                    "stock": ("died", "1", "2"),
                    "patched": ("survived", "300", "0"),
                    "control": ("hung", "60", "0"),
                },
                "pass",
            ),
        ],
    }


def test_the_pair_report_is_the_qemu_series_evidence(tmp_path: Path) -> None:
    from kseries import evidence

    series = series_stage.load(qemu_config())
    tip = "d" * 40
    report = pair_report(tmp_path, series.branch, tip)
    # the QEMU branch's tested commit is its tip build's, not the kernel's
    assert evidence._tested(report, tmp_path, series.branch) == tip
    assert evidence._tested(report, tmp_path, "other-v1") == ""
    assert evidence._tested(report, Path("/k"), "kvm-v2") == "a" * 40
    found = evidence._evidence(
        tip,
        tmp_path / "report.json",
        report,
        {},
        {"local_qemu": ["local-pair"]},
        None,
        series.branch,
    )
    assert not found.failures
    assert [(b.patches, b.ours) for b in found.builds] == [(1, True), (None, True)]
    [matrix] = found.matrices
    assert [(r.kernel, r.status) for r in matrix.rows] == [("base", "FAIL"), ("series", "PASS")]
    assert matrix.rows[1].cells[1].figures == (
        ("outcome", "survived"),
        ("toggles", "300"),
        ("memfault_exits", "0"),
    )
    body = Changelog(series).cover_letter(evidence=found).body
    testing = body[body.index("Testing:") :]
    assert "  cccccccccccc: patch 1\n  dddddddddddd: the whole series\n" in testing
    assert "  base:   bbbbbbbbbbbb (kvm-x86/next), 7.2.13\n" in testing
    assert "  series kernel (PASS):\n" in testing
    assert "    patched: outcome survived, toggles 300, memfault_exits 0\n" in testing
    assert "Not run: real hardware with an assigned device." in testing
    assert max(len(line) for line in testing.splitlines()) <= 72
    assert body.index("The KVM half") < body.index("Testing:")
