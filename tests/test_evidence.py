"""send-series' Testing section, from the newest test-remote report of exactly the branch sent.

The scratch project's series is rebased for real; report.json is written by the test-box
stage's own report.write() and the pointer by records.remember_test_report(), as test-remote
writes them, and the check record by the check stage's own SeriesCheck._record(). No box is booted
for these: the runs' verdicts and metrics are given. One thing is added by hand: each run's
"kvm" (the MMU and CPU read from the box), the shared contract's key that the "mmu3" change
makes Run.to_json write; an old report is one without it. The last test (slow) runs the real
chain, with a real QEMU box, on the 7.2 tree.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kseries import check, records
from kseries import series as series_stage
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.paths import PROJECT
from kseries.rebase import Rebase
from kseries.send import Outbox, Postman, SendSettings
from kseries.testbox import remote, report
from kseries.testbox.kernel import Kernel
from kseries.testbox.runner import TestResult
from tests.conftest import Project, git, invoke, one_error
from tests.test_send import fake_checkpatch
from tests.test_vfio_bar_race import config, series_kernel  # noqa: F401  (fixtures)

COVER = """demo: The cover

Two patches:
{% for s in subjects %}- {{ s }}
{% endfor %}
{% set testing %}{% include "cover-testing.j2" %}{% endset %}
{% if testing.strip() %}

{{ testing.strip() }}
{% endif %}

Thanks.
"""
# As the boxes show them: both vendor modules are built in, so kvm_intel's ept reads Y on AMD.
BOXES = {
    "local": (
        "TDP MMU",
        "AMD EPYC",
        {"kvm.tdp_mmu": "Y", "kvm_amd.npt": "Y", "kvm_intel.ept": "Y"},
    ),
    "local-legacy-tdp": (
        "legacy TDP MMU",
        "AMD EPYC",
        {"kvm.tdp_mmu": "N", "kvm_amd.npt": "Y", "kvm_intel.ept": "Y"},
    ),
    "local-shadow": (
        "shadow MMU",
        "QEMU Virtual CPU version 2.5+",
        {"kvm.tdp_mmu": "N", "kvm_amd.npt": "N", "kvm_intel.ept": "Y"},
    ),
}
METRICS = ("cycles", "memfault_exits", "ur_mmio", "deaths", "hangs", "guest_errors", "mmu")
SOAK = {  # per kernel: vfio-bar-race's summary line, as the program prints it on each box
    "ref kvm-x86/next": {"cycles": "1", "memfault_exits": "0", "ur_mmio": "0", "deaths": "1"},
    "kernel": {"cycles": "200", "memfault_exits": "200", "ur_mmio": "4100", "deaths": "0"},
}
PROGRAM_MMU = {"TDP MMU": "tdp_mmu", "legacy TDP MMU": "tdp", "shadow MMU": "shadow"}


@pytest.fixture
def sent(project: Project) -> Project:
    """The scratch series, its cover letter with the Testing slot (the project's own
    cover-testing.j2), rebased as `invoke rebase` does. get_maintainer.pl is not in this tree,
    and its checkpatch.pl is a stand-in."""
    shutil.copy(PROJECT / "templates" / "cover-testing.j2", project.root / "templates")
    (project.root / "templates" / "cover.j2").write_text(COVER)
    (project.configs / "toolkit.toml").write_text("[send]\nget_maintainer = false\n")
    rebase(project)
    fake_checkpatch(project.tree)  # a clean verdict: the scratch tree is not a kernel tree
    return project


def rebase(project: Project) -> None:
    Rebase(project.worktree(), project.series(), log=lambda _: None).start(
        remote="kvm-x86", branch="next"
    )


def tip(project: Project) -> str:
    return project.worktree().rev("refs/heads/demo-v2") or ""


def kernel(project: Project, commit: str, release: str, *, branch: str = "demo-v2") -> Kernel:
    """The kernel as test-remote loads it from a build manifest of the tree."""
    return Kernel(
        path=project.root / "bzImage",
        data=b"",
        sha256="0" * 64,
        kernelrelease=release,
        utsversion="#1 SMP PREEMPT Tue Dec  1 22:00:00 UTC 2026",
        tree=str(project.tree),
        branch=branch,
        commit=commit,
    )


def run(box: str, label: str, k: Kernel, statuses: dict[str, str]) -> report.Run:
    """One box and kernel, its tests given; vfio-bar-race with the soak figures of SOAK."""
    record = report.Run(box, label, k.to_json())
    for name, status in statuses.items():
        metrics = (
            {**SOAK[label], "hangs": "0", "guest_errors": "0", "mmu": PROGRAM_MMU[BOXES[box][0]]}
            if name == "vfio-bar-race"
            else {}
        )
        shown = METRICS if metrics else ()
        record.tests.append(TestResult(name, status, 0, 1.0, metrics=metrics, shown=shown))
    record.after = {"proc_version": f"Linux version {k.kernelrelease}", "boot_id": box}
    record.conclude()
    return record


def report_of(
    project: Project,
    *,
    kvm: bool = True,
    boxes: tuple[str, ...] = tuple(BOXES),
    series_status: str = "pass",
    dirty: bool = False,
    compare: bool = True,
    local_qemu: tuple[str, ...] = tuple(BOXES),
) -> Path:
    """A test-remote run of the branch's tip against the base, on `boxes`: report.json and the
    pointer to it, as test-remote writes them. Without `kvm`, a report from before test-remote
    read the MMU and CPU from the box."""
    series = kernel(project, tip(project), "7.2.13+")
    if dirty:
        series = dataclasses.replace(series, dirty=True)
    base_sha = records.recorded_base(project.worktree(), "demo-v2") or ""
    base = kernel(project, base_sha, "7.2.13", branch="")
    runs = []
    for box in boxes:
        if compare:
            runs.append(
                run(
                    box,
                    "ref kvm-x86/next",
                    base,
                    {"smoke": "pass", "fault_test": "fail", "vfio-bar-race": "fail"},
                )
            )
        runs.append(
            run(
                box,
                "kernel",
                series,
                {"smoke": "pass", "fault_test": series_status, "vfio-bar-race": "pass"},
            )
        )
    out = project.root / "out" / "test-remote" / "20261201-230000"
    path, _ = report.write(
        out,
        runs,
        {
            "kernel": series.to_json(),
            "compare": "kvm-x86/next" if compare else None,
            "boxes": list(boxes),
            "tests": ["smoke", "fault_test", "vfio-bar-race"],
            "finished_at": "2026-12-01T23:00:00+00:00",
        },
    )
    if kvm:  # the report's "kvm" key, as Run.to_json writes it from the box's readings
        data = json.loads(path.read_text())
        for entry in data["runs"]:
            mmu, cpu, params = BOXES[entry["box"]]
            entry["kvm"] = {
                "mmu": mmu,
                "tdp_mmu": params["kvm.tdp_mmu"] == "Y",
                "npt": params["kvm_amd.npt"] == "Y",
                "cpu": cpu,
                "params": params,
            }
        path.write_text(json.dumps(data, indent=2))
    records.remember_test_report(project.worktree(), series.to_json(), path, list(local_qemu))
    return path


def checked(project: Project, failed: bool = False) -> None:
    """`invoke check`'s record of the branch: two gates, every commit through each."""
    tree = project.worktree()
    commits = tree.git("log", "--reverse", "--format=%H %s", "kvm-x86/next..demo-v2")
    pairs = [(line[:40], line[41:]) for line in commits.splitlines()]
    gates = [
        check.Gate("x86_64-kvm-W1", "defconfig", ("kvm-modules",), "kvm-W1", description="W=1"),
        check.Gate("kvm-selftests", "tinyconfig", ("kvm-testbox",), "selftests"),
    ]
    results = [
        check.GateResult(g.name, sha, subject, not (failed and g.name == "kvm-selftests"))
        for g in gates
        for sha, subject in pairs
    ]
    base = records.recorded_base(tree, "demo-v2") or ""
    check.SeriesCheck(Config.load(project.configs), tree)._record(
        gates, "demo-v2", base, pairs, results
    )


def postman(project: Project, testing: bool = True) -> Postman:
    loaded = Config.load(project.configs)
    series = series_stage.load(loaded)
    return Postman(project.worktree(), series, SendSettings(loaded, series), testing=testing)


def cover(outbox: Outbox) -> str:
    return outbox.mails[0].path.read_text()


def section(text: str) -> str:
    return text[text.index("Testing:") : text.index("Thanks.")].strip()


def send_series(project: Project, *args: str) -> Any:
    return invoke(project, "send-series", "--tree", str(project.tree), *args, cwd=project.root)


def test_the_testing_section_from_the_report(sent: Project, tmp_path: Path) -> None:
    report_of(sent)
    checked(sent)
    man = postman(sent)
    outbox = man.format(tmp_path / "out")
    man.check(outbox, sending=False)
    base = records.recorded_base(sent.worktree(), "demo-v2") or ""
    assert section(cover(outbox)) == "\n".join(
        [
            "Testing:",
            "",
            "Kernels, each booted on every box and identified by its /proc/version:",
            f"  base:   {base[:12]} (kvm-x86/next), 7.2.13",
            f"  series: {tip(sent)[:12]}, 7.2.13+",
            "",
            "Boxes, each with its CPU model and the MMU its KVM used, as read from",
            "the box (QEMU guests, so the KVM under test ran nested):",
            "  local: AMD EPYC, TDP MMU",
            "  local-legacy-tdp: AMD EPYC, legacy TDP MMU",
            "  local-shadow: QEMU Virtual CPU version 2.5+, shadow MMU",
            "",
            "Tests, base -> series:",
            "  smoke: PASS -> PASS (TDP MMU, legacy TDP MMU, shadow MMU)",
            "  fault_test: FAIL -> PASS (TDP MMU, legacy TDP MMU, shadow MMU)",
            "  vfio-bar-race: FAIL -> PASS (TDP MMU, legacy TDP MMU, shadow MMU)",
            "",
            "vfio-bar-race, summed over the boxes:",
            "  base (3 boxes): 3 MEM toggles, 0 memory-fault exits, 3 VM deaths,",
            "    0 UR MMIO exits, 0 hangs, 0 guest errors, 0 dmesg splats",
            "  series (3 boxes): 600 MEM toggles, 600 memory-fault exits, 0 VM",
            "    deaths, 12300 UR MMIO exits, 0 hangs, 0 guest errors, 0 dmesg splats",
            "",
            "Every commit builds, with no warning its base does not have, in each",
            "gate of the series check:",
            "  x86_64-kvm-W1: W=1",
            "  kvm-selftests",
            "",
            "Not run: VMX/EPT (no Intel CPU here), KVM-unit-tests, real hardware.",
        ]
    )
    assert all(len(line) <= 72 for line in section(cover(outbox)).splitlines())
    # the rest of the letter is the branch description's, as format-patch wrote it
    assert cover(outbox).index("- demo: Change line 30") < cover(outbox).index("Testing:")
    assert "base-commit: " + outbox.base in cover(outbox)
    evidence = next(c for c in outbox.checks if c.name == "test evidence")
    assert evidence.ok and not evidence.warn, evidence
    assert not outbox.failed, outbox.failed


def test_the_rebase_renders_untested_section(sent: Project) -> None:
    """The branch description is rendered before any test: the slot stays empty there."""
    description = sent.worktree().git("config", "branch.demo-v2.description")
    assert "Testing" not in description and "Thanks." in description


def test_a_branch_moved_since_the_report_is_refused(
    sent: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report_of(sent)
    old = tip(sent)
    # New commits: what was tested is not what would be sent. Git dates have 1 s resolution, so
    # a rebase in the same second would remake the very same commits: date this one later.
    monkeypatch.setenv("GIT_COMMITTER_DATE", "2030-01-01T00:00:00+0000")
    rebase(sent)
    done = send_series(sent, "--out", str(tmp_path / "out"))
    one_error(
        done,
        f"demo-v2 moved since its newest test-remote report: it tested {old[:12]}, the "
        f"branch is now {tip(sent)[:12]} (rebuilt since, e.g. by a rebase)",
        "run `invoke build` and `invoke test-remote --compare kvm-x86/next` on it",
    )
    assert "--untested" in done.stderr
    assert not (tmp_path / "out").exists()


def test_commits_added_since_the_report_are_counted(sent: Project, tmp_path: Path) -> None:
    report_of(sent)
    old = tip(sent)
    sent.worktree().git("checkout", "-q", "demo-v2")
    (sent.tree / "file.c").write_text("changed\n")
    git(sent.tree, "commit", "-qam", "demo: One more")
    with pytest.raises(ToolkitError, match=f"it tested {old[:12]}, and 1 commit"):
        postman(sent).format(tmp_path / "out")


def test_no_report_is_refused_with_the_command_to_run(sent: Project, tmp_path: Path) -> None:
    done = send_series(sent, "--out", str(tmp_path / "out"))
    one_error(
        done,
        f"no test-remote report of demo-v2 ({tip(sent)[:12]}): the cover letter's Testing "
        "section is made from one",
        "run `invoke build` and `invoke test-remote --compare kvm-x86/next` on it (`invoke "
        "pipeline` does both), or add --untested to send without a Testing section",
    )
    assert not (tmp_path / "out").exists()
    done = send_series(sent, "--out", str(tmp_path / "out"), "--untested")
    assert done.returncode == 0, done.stderr
    letter = next((tmp_path / "out").glob("*0000-cover-letter.patch")).read_text()
    assert "Testing" not in letter and "Thanks." in letter
    assert "no Testing section (--untested)" in done.stdout


def test_an_old_report_without_the_mmu(sent: Project, tmp_path: Path) -> None:
    """No "kvm" in the runs: the MMU comes from what vfio-bar-race printed on the box, else it
    is said to be unknown; the check warns, and names no gates without a check record."""
    path = report_of(sent, kvm=False)
    data = json.loads(path.read_text())
    for entry in data["runs"]:  # local-shadow's program output did not say either
        if entry["box"] == "local-shadow":
            for test in entry["tests"]:
                test["metrics"].pop("mmu", None)
    path.write_text(json.dumps(data))
    man = postman(sent)
    outbox = man.format(tmp_path / "out")
    man.check(outbox, sending=False)
    text = section(cover(outbox))
    assert "  local: CPU model not recorded, TDP MMU" in text
    assert "  local-shadow: CPU model not recorded, MMU not recorded" in text
    assert "fault_test: FAIL -> PASS (TDP MMU, legacy TDP MMU, local-shadow)" in text
    assert "gate of the series check" not in text
    evidence = next(c for c in outbox.checks if c.name == "test evidence")
    assert evidence.ok and evidence.warn
    assert "does not say which MMU and CPU local, local-legacy-tdp, local-shadow ran" in (
        evidence.detail
    )
    assert "no `invoke check` record" in evidence.detail


def test_no_base_and_a_real_machine_are_said_so(sent: Project, tmp_path: Path) -> None:
    """test-remote without --compare, on a box of its own (not a local QEMU box)."""
    report_of(sent, compare=False, boxes=("local", "local-shadow"), local_qemu=("local",))
    man = postman(sent)
    outbox = man.format(tmp_path / "out")
    text = section(cover(outbox))
    assert "  local: AMD EPYC, TDP MMU, QEMU guest" in text
    assert "  local-shadow: QEMU Virtual CPU version 2.5+, shadow MMU, real\n    machine" in text
    assert "ran nested" not in text
    assert "Tests, series only (the base was not tested):" in text
    assert "  fault_test: PASS (TDP MMU, shadow MMU)" in text
    assert "  series (2 boxes): 400 MEM toggles, 400 memory-fault exits, 0 VM" in text
    assert "base (" not in text
    assert text.endswith("Not run: VMX/EPT (no Intel CPU here), KVM-unit-tests.")
    assert "no base kernel in the report" in man._evidence(outbox).detail


def test_a_failing_series_run_or_gate_fails_the_check(sent: Project, tmp_path: Path) -> None:
    report_of(sent, series_status="fail")
    checked(sent, failed=True)
    man = postman(sent)
    outbox = man.format(tmp_path / "out")
    man.check(outbox, sending=True)
    assert "fault_test: FAIL -> FAIL" in cover(outbox)
    assert "kvm-selftests" not in section(cover(outbox))  # only the gates that passed
    evidence = next(c for c in outbox.checks if c.name == "test evidence")
    assert not evidence.ok
    assert "check gate kvm-selftests failed on 2 commit(s)" in evidence.detail
    assert "local (7.2.13+): fail: fault_test fail" in evidence.detail
    with pytest.raises(ToolkitError, match="not sending"):
        man.send(outbox, dry_run=False)


def test_a_kernel_built_with_uncommitted_changes_is_refused(sent: Project, tmp_path: Path):
    report_of(sent, dirty=True)
    with pytest.raises(ToolkitError, match="built with uncommitted changes"):
        postman(sent).format(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_report_overwritten_by_another_kernel_is_refused(sent: Project, tmp_path: Path):
    path = report_of(sent)
    data = json.loads(path.read_text())
    data["kernel"]["commit"] = "f" * 40
    path.write_text(json.dumps(data))
    with pytest.raises(ToolkitError, match="was overwritten by a test of another build"):
        postman(sent).format(tmp_path / "out")


def test_a_cover_template_changed_since_the_rebase_is_refused(sent: Project, tmp_path: Path):
    report_of(sent)
    template = sent.root / "templates" / "cover.j2"
    template.write_text(template.read_text().replace("Thanks.", "Thank you."))
    with pytest.raises(ToolkitError, match=r"is not what .* renders now"):
        postman(sent).format(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_check_record_keeps_other_gates_and_replaces_a_damaged_one(sent: Project) -> None:
    path = records.check_record(sent.worktree(), "demo-v2")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{")  # damaged: this run's gates are all the check can vouch for
    checked(sent)
    tree = sent.worktree()
    pairs = [(tip(sent), "demo: Change line 30")]
    gate = check.Gate("i386-kvm-W1", "defconfig", ("kvm-i386",), "kvm-W1", arch="i386")
    result = check.GateResult(gate.name, tip(sent), "demo: Change line 30", True)
    check.SeriesCheck(Config.load(sent.configs), tree)._record(
        [gate], "demo-v2", "b", pairs, [result]
    )
    gates = json.loads(path.read_text())["gates"]
    assert sorted(gates) == ["i386-kvm-W1", "kvm-selftests", "x86_64-kvm-W1"]
    assert gates["i386-kvm-W1"] == {
        "description": "",
        "base": "b",
        "tip": tip(sent),
        "commits": 1,
        "failed": [],
    }
    assert gates["x86_64-kvm-W1"]["commits"] == 2


# --- the real chain: rebase, build, test-remote on a QEMU box, send-series --------------------


@pytest.mark.slow
def test_the_real_chain_puts_its_own_report_in_the_cover_letter(
    config: Config,  # noqa: F811  (the fixtures imported above)
    series_kernel: Path,  # noqa: F811
    series_clone: Path,
    tmp_path: Path,
) -> None:
    """The series rebased onto the 7.2 tree (series_clone), its kernel built by the build stage
    (both fixtures are test_vfio_bar_race's: the project's configs with the local boxes' state
    under tmp), test-remote with --compare on the `local` box, then the dry run: the real cover
    letter carries what that run found. Nothing is mocked; no `invoke check` runs here (its
    record is covered above), so the section names no gates and the check warns. Warm: one
    incremental build of each kernel and two TCG boots."""
    runs, directory = remote.test_remote(
        config,
        boxes=["local"],
        kernel_spec=str(series_kernel),
        tests=["smoke", "memory_fault_exit_test", "vfio-bar-race"],
        compare="kvm-x86/next",
        out=str(tmp_path / "report"),
        log=print,
    )
    assert [r.verdict for r in runs] == ["fail", "pass"], [(r.verdict, r.reason) for r in runs]
    tree = WorkTree(series_clone)
    project = Config.load()  # the series' own configs (the fixture's has no patches/)
    series = series_stage.load(project)
    tip = tree.rev(f"refs/heads/{series.branch}")
    pointer = json.loads(records.report_pointer(tree, series.branch).read_text())
    assert pointer["report"] == str(directory / "report.json")
    assert pointer["commit"] == runs[1].kernel["commit"] and pointer["local_qemu"] == ["local"]
    man = Postman(tree, series, SendSettings(project, series))
    if pointer["commit"] != tip:  # series_clone is shared: another session rebased it meanwhile
        with pytest.raises(ToolkitError, match="moved since its newest test-remote report"):
            man.format(tmp_path / "out")
        pytest.skip("another test session rebased the shared series clone during this test")
    outbox = man.format(tmp_path / "out")
    man.rehearse(outbox)
    letter = outbox.mails[0].path.read_text()
    print(letter[: letter.index("base-commit:")])
    text = letter[letter.index("Testing:") : letter.index("\nv1:")]
    assert f"  series: {tip[:12]}, {runs[1].kernel['kernelrelease']}" in text
    assert "  memory_fault_exit_test: FAIL -> PASS (" in text
    assert "  vfio-bar-race: FAIL -> PASS (" in text
    assert all(len(line) <= 72 for line in text.splitlines()), text
    assert not outbox.failed, outbox.failed
    evidence = next(c for c in outbox.checks if c.name == "test evidence")
    assert evidence.warn and "no `invoke check` record" in evidence.detail
