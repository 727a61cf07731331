"""`invoke check`: the gates parse and fail early; on the real tree every commit of the series
builds in every gate (x86_64 with KVM_WERROR, i386, the KVM selftests) with no new warning, and
a commit that adds one is caught, in the gate and commit that added it. Real gcc builds,
nothing mocked.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kseries import check
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.paths import PROJECT

SUBJECT = "KVM: x86/mmu: add a warning"


def test_warnings_are_keyed_by_tree_path_and_text_not_line(tmp_path: Path) -> None:
    tree, out = tmp_path / "src" / "linux", tmp_path / "build" / "x"
    (tree / "arch/x86/kvm/mmu").mkdir(parents=True)
    out.mkdir(parents=True)
    log = (
        "  CC [M]  arch/x86/kvm/mmu/mmu.o\n"
        "../../src/linux/arch/x86/kvm/mmu/mmu.c:4711:13: warning: unused variable 'x'"
        " [-Wunused-variable]\n"
        f"{tree}/arch/x86/kvm/x86.c:12: warning: no previous prototype [-Wmissing-prototypes]\n"
        "../../src/linux/arch/x86/kvm/mmu/mmu.c:4712:1: error: expected ';'\n"
    )
    assert check.warnings(log, tree, out) == {
        "arch/x86/kvm/mmu/mmu.c: unused variable 'x' [-Wunused-variable]",
        "arch/x86/kvm/x86.c: no previous prototype [-Wmissing-prototypes]",
    }
    moved = log.replace(":4711:13:", ":4790:13:")
    assert check.warnings(moved, tree, out) == check.warnings(log, tree, out)


def test_project_gates_load() -> None:
    gates = check.Gate.load_all(Config.load(PROJECT / "configs"))
    assert [(g.name, g.arch) for g in gates] == [
        ("x86_64-kvm-W1", ""),
        ("i386-kvm-W1", "i386"),
        ("kvm-selftests", ""),
    ]
    assert all(g.base_config == "defconfig" and g.target == "kvm-W1" for g in gates[:2])
    assert gates[2].target == "selftests"


def test_a_bad_gate_is_refused_before_any_build(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "series.toml").write_text("")
    (configs / "toolkit.toml").write_text(
        '[[check.gate]]\nname = "g"\nbase_config = "defconfig"\ntarget = "kvm-W1"\n'
        'fragments = ["no-such"]\n'
    )
    with pytest.raises(ToolkitError) as e:
        check.Gate.load_all(Config.load(configs))
    assert "no-such" in e.value.message
    (configs / "toolkit.toml").write_text(
        '[[check.gate]]\nname = "g"\nbase_config = "defconfig"\ntarget = "kvm-W1"\nwat = 1\n'
    )
    with pytest.raises(ToolkitError) as e:
        check.Gate.load_all(Config.load(configs))
    assert "toolkit.toml [[check.gate]] #1" in e.value.message and "wat" in e.value.message


def test_a_qemu_series_gate_is_its_own_meson_build(tmp_path: Path) -> None:
    """The QEMU series' gates build [build.meson]'s configuration: a target only; a kernel
    build's settings in one are refused, naming the file, the row and the key. The QEMU
    series' base does not build there (its patch 1 is the fix): base_builds = false."""
    for name in ("qemu", "outer-qemu"):
        (gate,) = check.Gate.load_all(Config.load(PROJECT / "configs", name))
        assert (gate.target, gate.base_config, gate.fragments) == ("qemu-system-x86_64", "", ())
        assert gate.base_builds == (name == "outer-qemu")  # the QEMU series' patch 1 fixes it
    configs = tmp_path / "configs"
    shutil.copytree(PROJECT / "configs" / "qemu", configs / "qemu")
    (configs / "series.toml").write_text("")
    toolkit = configs / "qemu" / "toolkit.toml"
    text = toolkit.read_text().replace(
        "base_builds = false\n", 'base_builds = false\nfragments = ["kvm"]\n'
    )
    assert text != toolkit.read_text()
    toolkit.write_text(text)
    with pytest.raises(ToolkitError) as e:
        check.Gate.load_all(Config.load(configs, "qemu"))
    assert e.value.message.startswith(f"{toolkit} [[check.gate]] #1: fragments")
    assert "meson" in e.value.message and "target only" in e.value.hint


@pytest.mark.slow
def test_every_commit_passes_and_a_new_warning_is_caught(series_clone: Path) -> None:
    config = Config.load(PROJECT / "configs")
    tree = WorkTree(series_clone)
    gates = check.Gate.load_all(config)
    runner = check.SeriesCheck(config, tree, log=print)
    results = runner.run(gates, "kvm-x86/next", "HEAD")
    assert [r.ok for r in results] == [True] * 9, check.details(results)
    assert {r.gate for r in results} == {"x86_64-kvm-W1", "i386-kvm-W1", "kvm-selftests"}
    # patches 1 and 2 change mmu.c, which each gate recompiles; patch 3 (a selftest) nothing
    assert [r.recompiled > 0 for r in results if r.gate == "x86_64-kvm-W1"] == [True, True, False]

    # a commit that adds a W=1 warning, on a throwaway branch of the clone
    tree.git("checkout", "-q", "-B", "kseries-test-warning")
    mmu = series_clone / "arch/x86/kvm/mmu/mmu.c"
    text = mmu.read_text()
    mmu.write_text(text.replace("\treturn -EFAULT;\n}", "\tint unused;\n\n\treturn -EFAULT;\n}", 1))
    tree.git("-c", "user.name=T", "-c", "user.email=t@example.org", "commit", "-qam", SUBJECT)
    try:
        caught = runner.run(gates, "kvm-x86/next", "HEAD")
    finally:
        tree.git("checkout", "-q", "-")
    last = {r.gate: r for r in caught if r.subject == SUBJECT}
    assert not last["x86_64-kvm-W1"].ok and "unused variable" in last["x86_64-kvm-W1"].error
    assert last["i386-kvm-W1"].new_warnings == [
        "arch/x86/kvm/mmu/mmu.c: unused variable 'unused' [-Wunused-variable]"
    ]
    assert last["kvm-selftests"].ok  # mmu.c is not part of the selftests
    assert all(r.ok for r in caught if r.subject != SUBJECT)


def test_a_tree_without_the_series_is_refused_with_the_hint(tmp_path: Path) -> None:
    repo = tmp_path / "linux"
    repo.mkdir()
    ident = ["-c", "user.name=T", "-c", "user.email=t@example.org"]
    subprocess.run(["git", "init", "-q", "-b", "master", str(repo)], check=True)
    subprocess.run(
        ["git", *ident, "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "b"], check=True
    )
    runner = check.SeriesCheck(Config.load(PROJECT / "configs"), WorkTree(repo), log=print)
    with pytest.raises(ToolkitError) as e:
        runner.commits("kvm-x86/next", "master")
    assert e.value.message == f"{repo}: no kvm-x86/next" and "invoke rebase" in e.value.hint
    with pytest.raises(ToolkitError) as e:
        runner.commits("master", "master")
    assert e.value.message == "master has no commits on top of master"
