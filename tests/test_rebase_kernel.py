"""The real thing: the project's series onto the embedded 7.2 tree's kvm-x86/next."""

from __future__ import annotations

from pathlib import Path

import pytest

from kseries import series as series_stage
from kseries.config import Config
from kseries.gitrepo import WorkTree
from kseries.rebase import Rebase
from kseries.tree import scratch_clone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared clone of the default tree (the cached tree itself stays as the user left it)."""
    return scratch_clone(tmp_path_factory.mktemp("kernel") / "linux")


def test_series_rebases_onto_the_real_tree(kernel_clone: Path) -> None:
    series = series_stage.load(Config.load())
    tree = WorkTree(kernel_clone)
    result = Rebase(tree, series, log=lambda _: None).start(remote="kvm-x86", branch="next")
    assert result.branch == "kvm-x86-mmu-memory-fault-v2"
    assert len(result.commits) == len(series.patches)
    assert tree.head() == "refs/heads/kvm-x86-mmu-memory-fault-v2"
    log = tree.git("log", "--reverse", "--format=%an <%ae>%n%B%x00", "kvm-x86/next..")
    first = log.split("\0")[0].strip()
    assert first.startswith("Anish Moorthy <amoorthy@google.com>\nKVM: x86/mmu: ")
    assert first.endswith(
        "Signed-off-by: Anish Moorthy <amoorthy@google.com>\n"
        "Co-developed-by: Mikhail Malyshev <mike.malyshev@gmail.com>\n"
        "Signed-off-by: Mikhail Malyshev <mike.malyshev@gmail.com>"
    )
    mmu = (kernel_clone / "arch/x86/kvm/mmu/mmu.c").read_text()
    assert "\tkvm_mmu_prepare_memory_fault_exit(vcpu, fault);\n\treturn -EFAULT;\n}" in mmu
    assert tree.git("status", "--porcelain", "--untracked-files=no") == ""

    again = Rebase(tree, series, log=lambda _: None).start(remote="kvm-x86", branch="next")
    assert again.backup_ref == "refs/kseries/attempts/kvm-x86-mmu-memory-fault-v2/1"
    assert again.range_diff.count(" = ") == len(series.patches)
