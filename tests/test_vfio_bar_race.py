"""The v1 field bug, reproduced in CI (tests/box/vfio_bar_race.c on the shipped local boxes).

The series goes onto a clone of the embedded 7.2 tree with the rebase stage and is built by the
build stage; `test_remote --compare kvm-x86/next` builds the base the same way, as the main
command does. Then, on QEMU boxes from configs/testboxes.toml (only their state directories are
moved under tmp, so a developer's own boxes are left alone):

- the base kernel kills the VM at the first disabled-BAR access, the series kernel survives
  every toggle (`--trace` shows the fault path on both);
- a soak on two boxes in parallel (noiommu, and q35 with a real intel-iommu group) merges into
  one report;
- a box with no device skips, with the reason.

Cold: one clone checkout, two kernel builds sharing ccache with the default build. Nothing is
mocked.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kseries.config import Config
from kseries.paths import PROJECT
from kseries.testbox import local, remote, report
from kseries.testbox.box import TestboxConfig
from kseries.testbox.runner import TestResult
from tests.boxsupport import build_series_kernel

pytestmark = pytest.mark.slow

CYCLES = 100  # per box; about 1 s of toggling under TCG


BOXES = ("local", "local-viommu", "nodev")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Config]:
    """The project's configs, with every local box's state under tmp; the boxes are stopped
    (by the PIDs they were started with) at the end."""
    root = tmp_path_factory.mktemp("vfio")
    configs = root / "configs"
    shutil.copytree(PROJECT / "configs", configs, ignore=shutil.ignore_patterns("local.toml"))
    state = root / "state"
    (configs / "local.toml").write_text(
        f'[box.local.qemu]\nstate_dir = "{state / "local"}"\n'
        f'[box.local-viommu.qemu]\nstate_dir = "{state / "local-viommu"}"\n'
        "[box.nodev]  # a QEMU box with no edu device\n"
        'method = "qemu"\ncmdline = "console=ttyS0 panic=-1"\n'
        f'qemu = {{ cpu = "max", state_dir = "{state / "nodev"}" }}\n'
    )
    config = Config.load(configs)
    yield config
    settings = TestboxConfig.load(config)
    for name in BOXES:
        local.down(settings.box(name), log=lambda _: None)


@pytest.fixture(scope="module")
def series_kernel(config: Config, series_clone: Path) -> Path:
    """The series kernel, built by the build stage; its manifest."""
    return build_series_kernel(config, series_clone)


def run(config: Config, out: Path, **options: object) -> list[report.Run]:
    started = time.monotonic()
    runs, _ = remote.test_remote(config, out=str(out), log=print, **options)  # type: ignore[arg-type]
    print(f"test_remote {options.get('boxes')}: {time.monotonic() - started:.0f}s")
    return runs


def race(run: report.Run) -> TestResult:
    return next(t for t in run.tests if t.name == "vfio-bar-race")


def test_base_kills_the_vm_and_the_series_survives(
    config: Config, series_kernel: Path, tmp_path: Path
) -> None:
    base, fixed = run(
        config,
        tmp_path,
        boxes=["local"],
        kernel_spec=str(series_kernel),
        tests=["smoke", "vfio-bar-race"],
        compare="kvm-x86/next",
        cycles=CYCLES,
        trace=True,
    )
    assert base.label == "ref kvm-x86/next" and fixed.label == "kernel"
    died, survived = race(base), race(fixed)
    assert died.status == "fail" and died.metrics["deaths"] == "1", died.stdout
    assert died.reason.startswith("vm-died-efault")
    assert died.metrics["memfault_exits"] == "0"
    assert survived.status == "pass", survived.stdout
    assert survived.metrics["cycles"] == str(CYCLES) and survived.metrics["deaths"] == "0"
    assert int(survived.metrics["memfault_exits"]) > 0
    assert survived.metrics["guest_errors"] == "0" and survived.metrics["iommu"] == "noiommu"
    assert (base.verdict, fixed.verdict) == ("fail", "pass")
    assert not fixed.splats and not base.splats
    # the fault path, as the probes saw it: kvm_mmu_faultin_pfn failed with -EFAULT on both;
    # only the series prepared a memory-fault exit for it
    for r in (base, fixed):
        assert r.trace is not None and r.trace.available, r.trace
        assert r.trace.returns["kvm_mmu_faultin_pfn"].get(-14, 0) >= 1, r.trace.lines()
    prepared = fixed.trace.calls["kvm_mmu_prepare_memory_fault_exit"]
    assert prepared >= int(survived.metrics["memfault_exits"])
    assert base.trace.calls.get("kvm_mmu_prepare_memory_fault_exit", 0) == 0
    print("\n".join(report.details([base, fixed])))
    print(f"base: {died.duration:.1f}s; series: {survived.duration:.1f}s for {CYCLES} cycles")


def test_soak_on_two_boxes_merges_into_one_report(
    config: Config, series_kernel: Path, tmp_path: Path
) -> None:
    runs = run(
        config,
        tmp_path,
        boxes=["local", "local-viommu"],
        kernel_spec=str(series_kernel),
        tests=["vfio-bar-race"],
        cycles=CYCLES,
    )
    assert [r.verdict for r in runs] == ["pass", "pass"], report.details(runs)
    rows = report.soak_rows(runs)["vfio-bar-race"]
    assert [r["box"] for r in rows] == ["local", "local-viommu", "all boxes"]
    assert [r["iommu"] for r in rows[:2]] == ["noiommu", "type1v2"]
    total = rows[2]
    assert total["cycles"] == 2 * CYCLES and total["deaths"] == 0 and total["dmesg"] == 0
    assert total["memfault_exits"] >= 2
    print("\n".join(str(r) for r in rows))


def test_a_box_without_the_device_skips_with_the_reason(
    config: Config, series_kernel: Path, tmp_path: Path
) -> None:
    (nodev,) = run(
        config,
        tmp_path,
        boxes=["nodev"],
        kernel_spec=str(series_kernel),
        tests=["vfio-bar-race"],
    )
    result = race(nodev)
    assert result.status == "skip" and "1234:11e8 (QEMU edu) device" in result.reason
    assert nodev.verdict == "pass"
