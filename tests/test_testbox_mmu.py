"""KVM's three MMUs as box data and as read back from a box: kvm_params in the box schema and
on the command line, the sysfs readings turned into an MMU, a claim the box does not show, and
the verdict table's MMU and CPU rows. Fast; the readings are what real boxes printed (a
7.2.13 guest under TCG), and the slow test in test_testbox_qemu.py reads a real one."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.paths import PROJECT
from kseries.testbox import boot, kernel, mmu, plan, report, runner
from kseries.testbox.box import TestboxConfig, parse_box

EPYC = "model name\t: AMD EPYC Processor\n"
MAX_FLAGS = "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep svm lahf_lm npt nrip_save\n"
QEMU64 = "model name\t: QEMU Virtual CPU version 2.5+\n"
INTEL = "model name\t: Intel(R) Xeon(R) Gold 6338\nflags\t\t: fpu vme vmx ept\n"


def readings(tdp_mmu: str, npt: str, ept: str = "Y", cpu: str = EPYC + MAX_FLAGS) -> str:
    return (
        f"param /sys/module/kvm/parameters/tdp_mmu {tdp_mmu}\n"
        f"param /sys/module/kvm_amd/parameters/npt {npt}\n"
        f"param /sys/module/kvm_intel/parameters/ept {ept}\n"
        f"{cpu}dev_kvm yes\n"
    )


def test_the_three_mmus_follow_from_the_readings() -> None:
    tdp = mmu.parse(readings("Y", "Y"), {})
    assert (tdp.mmu, tdp.tdp_mmu, tdp.npt, tdp.cpu) == ("TDP MMU", True, True, "AMD EPYC Processor")
    assert tdp.params == {"kvm.tdp_mmu": "Y", "kvm_amd.npt": "Y", "kvm_intel.ept": "Y"}
    assert mmu.parse(readings("N", "Y"), {}).mmu == "legacy TDP MMU"
    # 7.2 shows tdp_mmu as the outcome (N without NPT); older kernels showed the wish (Y):
    # both are the shadow MMU when TDP is off
    for wish in ("N", "Y"):
        shadow = mmu.parse(readings(wish, "N"), {})
        assert (shadow.mmu, shadow.npt) == ("shadow MMU", False)
    qemu64 = mmu.parse(readings("N", "N", cpu=QEMU64 + "flags\t\t: fpu svm\n"), {})
    assert (qemu64.mmu, qemu64.cpu) == ("shadow MMU", "QEMU Virtual CPU version 2.5+")


def test_the_cpu_flag_picks_the_vendor_parameter_that_counts() -> None:
    # both vendor modules built in: kvm_intel's ept reads Y on an AMD CPU and means nothing
    assert mmu.parse(readings("N", "N", ept="Y"), {}).mmu == "shadow MMU"
    intel = mmu.parse(readings("Y", "Y", ept="N", cpu=INTEL), {})
    assert (intel.mmu, intel.npt) == ("shadow MMU", None)
    assert mmu.parse(readings("Y", "N", ept="Y", cpu=INTEL), {}).mmu == "TDP MMU"


def test_a_box_that_cannot_say_is_unknown() -> None:
    no_kvm = readings("Y", "Y").replace("dev_kvm yes\n", "")
    assert mmu.parse(no_kvm, {}).mmu == "unknown"  # KVM never initialised
    no_virt = readings("Y", "Y", cpu=QEMU64 + "flags\t\t: fpu vme\n")
    assert mmu.parse(no_virt, {}).mmu == "unknown"
    empty = mmu.parse("", {})
    assert empty.to_json() == {
        "mmu": "unknown",
        "tdp_mmu": None,
        "npt": None,
        "cpu": "",
        "params": {},
    }


def test_a_claim_the_box_does_not_show_is_named() -> None:
    claims = {"kvm.tdp_mmu": "0", "kvm_amd.npt": "off", "kvm.eager_page_split": "N"}
    text = readings("N", "N") + "param /sys/module/kvm/parameters/eager_page_split N\n"
    assert mmu.parse(text, claims).mismatches == ()  # 0, off and N all read back as N
    ignored = mmu.parse(readings("Y", "Y"), {"kvm.tdp_mmu": "0"})
    assert ignored.mmu == "TDP MMU"
    assert ignored.mismatches == ("claims kvm.tdp_mmu=0, but the box shows kvm.tdp_mmu=Y",)
    missing = mmu.parse(readings("Y", "Y"), {"kvm.tdp_mmuu": "0"})
    assert missing.mismatches == (
        "claims kvm.tdp_mmuu=0, but the box has no /sys/module/kvm/parameters/tdp_mmuu",
    )


def test_the_read_command_runs_in_a_shell(tmp_path: Path) -> None:
    """The command as the box runs it (here in this machine's sh, with /sys/module as it is
    here: no kvm module, so only what exists is printed)."""
    script = mmu.command({"kvm.tdp_mmu": "0", "kvm_amd.npt": "0", "kvm.halt_poll_ns": "0"})
    assert script.count("tdp_mmu") == 1  # read once, claimed or not
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert "model name" in out or "flags" in out
    for line in out.splitlines():
        if line.startswith("param "):
            assert Path(shlex.split(line)[1]).is_file()


# --- the box data ---------------------------------------------------------------------------


def test_kvm_params_reach_the_command_line_once() -> None:
    box = parse_box(
        "x",
        {"qemu": {}, "cmdline": "console=ttyS0 kvm_amd.npt=0", "kvm_params": {"kvm.tdp_mmu": "0"}},
        PROJECT,
        "[box.x]",
    )
    assert box.kvm_claims == {"kvm_amd.npt": "0", "kvm.tdp_mmu": "0"}
    line = box.with_kvm_params(box.cmdline)
    assert line == "console=ttyS0 kvm_amd.npt=0 kvm.tdp_mmu=0"
    assert box.with_kvm_params(line) == line


def test_kexec_appends_the_params_to_a_reused_command_line() -> None:
    image = kernel.Kernel(Path("bzImage"), b"", "0" * 64, "7.2.13", "#1")
    reused = boot.Staged(image, None, None, "kvm.tdp_mmu=0", reuse_cmdline=True)
    assert boot.kexec_cmdline(reused) == ["--reuse-cmdline", "--append=kvm.tdp_mmu=0"]
    own = boot.Staged(image, None, None, "console=ttyS0 kvm.tdp_mmu=0")
    assert boot.kexec_cmdline(own) == ["--append=console=ttyS0 kvm.tdp_mmu=0"]
    assert boot.kexec_cmdline(boot.Staged(image, None, None, "")) == ["--reuse-cmdline"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"kvm_params": {"tdp_mmu": "0"}}, r"\[box.x.kvm_params\]: 'tdp_mmu' is not MODULE.PARAM"),
        ({"kvm_params": {"vfio.x": "1"}}, "'vfio.x' is not MODULE.PARAM of kvm, kvm_amd"),
        ({"kvm_params": {"kvm.tdp_mmu": 0}}, "kvm.tdp_mmu must be a string, not the integer 0"),
        ({"kvm_params": {"kvm.tdp_mmu": "0 1"}}, "kvm.tdp_mmu must be one word"),
        (
            {"kvm_params": {"kvm.tdp_mmu": "0"}, "cmdline": "kvm.tdp_mmu=1"},
            "kvm.tdp_mmu is set in both cmdline and kvm_params",
        ),
    ],
)
def test_bad_kvm_params_are_one_line_errors(table: dict, message: str) -> None:
    with pytest.raises(ToolkitError, match=message):
        parse_box("x", {"qemu": {}, **table}, PROJECT, "[box.x]")


def test_a_grub_box_cannot_claim_kvm_params() -> None:
    table = {"method": "grub-reboot", "host": "h", "identity": "i", "known_hosts": "k"}
    with pytest.raises(ToolkitError, match="kvm_params needs a boot method that passes"):
        parse_box("x", {**table, "kvm_params": {"kvm.tdp_mmu": "0"}}, PROJECT, "[box.x]")


def test_the_default_pipeline_covers_the_three_mmus() -> None:
    settings = TestboxConfig.load(Config.load(PROJECT / "configs"))
    legacy = settings.box("local-legacy-tdp")
    assert legacy.kvm_claims == {"kvm.tdp_mmu": "0"}
    assert legacy.qemu and legacy.qemu.cpu == "max"
    first = plan.runs(settings)[0]  # [[pipeline.run]]: the three MMUs, the default tests
    assert first == plan.TestRun(("local", "local-legacy-tdp", "local-shadow"))
    fragment = (PROJECT / "configs" / "kvm-testbox.config").read_text().splitlines()
    assert "CONFIG_KVM=y" in fragment  # built in: kvm.* on the command line applies


# --- the report -----------------------------------------------------------------------------


def test_the_table_shows_the_mmu_each_column_ran(tmp_path: Path) -> None:
    ident = {"proc_version": "Linux version 7.2.13+", "boot_id": "b"}
    runs = []
    for box, text, claims in (
        ("local", readings("Y", "Y"), {}),
        ("local-legacy-tdp", readings("N", "Y"), {"kvm.tdp_mmu": "0"}),
        ("local-liar", readings("Y", "Y"), {"kvm.tdp_mmu": "0"}),
    ):
        run = report.Run(box, "kernel", {}, after=ident, kvm=mmu.parse(text, claims))
        run.tests = [runner.TestResult("memory_fault_exit_test", "pass", 0, 1.0)]
        run.conclude()
        runs.append(run)
    runs.append(report.Run("dead", "kernel", {}, verdict="boot failed"))
    assert [r.verdict for r in runs] == ["pass", "pass", "fail", "boot failed"]
    assert runs[2].reason == (
        "box local-liar claims kvm.tdp_mmu=0, but the box shows kvm.tdp_mmu=Y"
    )
    out = Console(width=160, record=True, color_system=None)
    out.print(report.table(runs))
    text = out.export_text()
    mmu_row = next(line for line in text.splitlines() if "MMU (read)" in line)
    assert "TDP MMU" in mmu_row and "legacy TDP MMU" in mmu_row
    assert "not as claimed" in text and "AMD EPYC Processor" in text
    report.write(tmp_path, runs, {})
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["runs"][1]["kvm"] == {
        "mmu": "legacy TDP MMU",
        "tdp_mmu": False,
        "npt": True,
        "cpu": "AMD EPYC Processor",
        "params": {"kvm.tdp_mmu": "N", "kvm_amd.npt": "Y", "kvm_intel.ept": "Y"},
    }
    assert "kvm" not in data["runs"][3]  # never read: absent
