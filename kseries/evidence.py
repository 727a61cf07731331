"""The cover letter's Testing section, from the newest test-remote report of exactly the branch
being sent.

test-remote points `.git/kseries/test-remote/BRANCH.json` at the report.json it wrote, with the
commit its kernel was built from (kseries.records); `invoke check` keeps the gates each commit
passed beside it. Send finds both here and refuses what it cannot vouch for: no report, a report
of another commit (the branch moved since), a kernel built with uncommitted changes. The words
are templates/cover-testing.j2's, every figure is the report's; the section is put into the
cover letter format-patch wrote from the branch description, which `invoke rebase` rendered
before any test could run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kseries import records
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.series import Series

SERIES = "kernel"  # the label test-remote gives the kernel under test; the base's is "ref REF"
UNKNOWN = "unknown"
# What tests/box/vfio_bar_race.c prints as mmu= (it reads the same sysfs files), for a report
# from before test-remote recorded the MMU of each run itself.
PROGRAM_MMU = {"tdp_mmu": "TDP MMU", "tdp": "legacy TDP MMU", "shadow": "shadow MMU"}
SOAK_KEYS = ("box", "kernel", "status")  # a soak row's columns that are not figures


@dataclass(frozen=True)
class Kernel:
    commit: str
    kernelrelease: str
    ref: str = ""  # the base's --compare ref; empty for the series


@dataclass(frozen=True)
class Box:
    """A box as the report saw it: its CPU and the MMU its KVM used, read from the box."""

    name: str
    cpu: str  # empty: the report does not say
    mmu: str  # "TDP MMU", "legacy TDP MMU", "shadow MMU" or "unknown"
    params: dict[str, Any]
    label: str  # how a result names it: its MMU, unless that is unknown or not unique
    qemu: bool  # a local QEMU box (the KVM under test ran nested), not a machine of its own
    intel: bool  # its KVM ran on kvm_intel (VMX, EPT)


@dataclass(frozen=True)
class Outcome:
    """One test's status on the base and on the series, the same on each of `boxes`."""

    test: str
    base: str  # empty without a base run
    series: str
    boxes: tuple[str, ...]


@dataclass(frozen=True)
class Soak:
    """A soak test's figures on one kernel, summed over its boxes."""

    test: str
    kernel: str  # "base" or "series"
    boxes: int
    figures: dict[str, Any]  # metric -> the figure; a metric with no sum is left out


@dataclass(frozen=True)
class Gate:
    name: str
    description: str


@dataclass(frozen=True)
class Build:
    """Another series' build a test used: "series:NAME" at its tip, or after N patches."""

    series: str  # its --series name
    commit: str
    patches: int | None  # None: the whole series
    ours: bool  # a build of the series being sent (of its branch)


@dataclass(frozen=True)
class Cell:
    name: str
    figures: tuple[tuple[str, str], ...]  # (metric, value), in the test's order


@dataclass(frozen=True)
class MatrixRow:
    kernel: str  # "base" or "series"
    status: str
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Matrix:
    """A matrix test on one box (the kernel+VMM pair): a row per kernel, a cell per VMM."""

    test: str
    box: str
    rows: tuple[MatrixRow, ...]


@dataclass(frozen=True)
class Evidence:
    """What the Testing section says, and what the pre-send check says about it."""

    report: Path
    series: Kernel
    base: Kernel | None
    boxes: tuple[Box, ...]
    outcomes: tuple[Outcome, ...]
    soaks: tuple[Soak, ...]
    gates: tuple[Gate, ...]
    builds: tuple[Build, ...]  # the other series' builds the tests used (a VMM)
    matrices: tuple[Matrix, ...]
    intel: bool  # some box ran kvm_intel (VMX, EPT)
    real_hardware: bool  # some box was not a local QEMU box
    failures: tuple[str, ...]  # what must stop a send: a failed series run, a failed gate
    warnings: tuple[str, ...]  # what the sender should read first

    def verdict(self) -> tuple[bool, str, bool]:
        """(ok, detail, warn) for send's "test evidence" check."""
        detail = "; ".join([*self.failures, *self.warnings, f"from {self.report}"])
        return not self.failures, detail, bool(self.warnings)


def find(tree: WorkTree, series: Series) -> Evidence:
    """The evidence for `series.branch` as it is now; refused unless a report tested its tip."""
    branch = series.branch
    tip = tree.rev(f"refs/heads/{branch}") or ""
    base_ref = f"{series.base.remote}/{series.base.branch}"
    untested = "or add --untested to send without a Testing section"
    retest = (
        f"run `invoke build` and `invoke test-remote --compare {base_ref}` on it (`invoke "
        f"pipeline` does both), {untested}"
    )
    if series.configs and series.source.parent != series.configs:  # configs/NAME: a VMM's
        retest = (
            "run `invoke test-remote` with a test whose files build it at its tip "
            f"(series:{series.source.parent.name}), {untested}"
        )
    pointer = records.read(
        records.report_pointer(tree, branch), "test-remote record", "invoke test-remote"
    )
    if pointer is None:
        raise ToolkitError(
            f"no test-remote report of {branch} ({tip[:12]}): the cover letter's Testing "
            "section is made from one",
            retest,
        )
    commit = str(pointer.get("commit") or "")
    if commit != tip:
        raise ToolkitError(
            f"{branch} moved since its newest test-remote report: {_moved(tree, commit, tip)}",
            retest,
        )
    if pointer.get("dirty"):
        raise ToolkitError(
            f"the newest test-remote report of {branch} tested a kernel built with uncommitted "
            f"changes in the tree, so {tip[:12]} does not say what was tested",
            "commit or stash them, then " + retest,
        )
    path = Path(str(pointer.get("report")))
    try:
        report = json.loads(path.read_text())
        tested = _tested(report, tree.path, branch)
    except FileNotFoundError:
        raise ToolkitError(
            f"{path}, the newest test-remote report of {branch}, is gone", retest
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise records.damaged(path, "test-remote report", "invoke test-remote", e) from e
    if tested != commit:
        raise ToolkitError(
            f"{path} was overwritten by a test of another build ({tested[:12] or 'none'}), not "
            f"{branch} {tip[:12]}",
            retest,
        )
    check = records.read(records.check_record(tree, branch), "check record", "invoke check")
    return _evidence(
        tip, path, report, check or {}, pointer, records.recorded_base(tree, branch), branch
    )


def _tested(report: dict[str, Any], tree: Path, branch: str) -> str:
    """The commit of `branch` the report tested: its kernel's, or a series build's at its tip
    (a VMM series is tested as a file of the kernel's tests); empty if neither."""
    kernel = report["kernel"]
    if kernel.get("branch") == branch and _same(kernel.get("tree"), tree):
        return str(kernel["commit"])
    for build in report.get("series_builds") or []:
        tip = build.get("branch") == branch and build.get("patches") is None
        if tip and _same(build.get("tree"), tree):
            return str(build["commit"])
    return ""


def _same(path: object, tree: Path) -> bool:
    return bool(path) and Path(str(path)).resolve() == tree.resolve()


def _moved(tree: WorkTree, tested: str, tip: str) -> str:
    if tree.try_git("merge-base", "--is-ancestor", tested, tip)[0] == 0:
        count = tree.git("rev-list", "--count", f"{tested}..{tip}").strip()
        return (
            f"it tested {tested[:12]}, and {count} commit(s) were added on top since ({tip[:12]})"
        )
    return (
        f"it tested {tested[:12]}, the branch is now {tip[:12]} (rebuilt since, e.g. by a rebase)"
    )


def _evidence(
    tip: str,
    path: Path,
    report: dict[str, Any],
    check: dict[str, Any],
    pointer: dict[str, Any],
    recorded_base: str | None,
    branch: str,
) -> Evidence:
    runs = [r for r in report.get("runs") or [] if isinstance(r, dict)]
    mine = [r for r in runs if r.get("label") == SERIES]
    theirs = [r for r in runs if r.get("label") != SERIES]
    kernel = report["kernel"]
    series = Kernel(str(kernel["commit"]), str(kernel.get("kernelrelease", "")))
    base = None
    warnings: list[str] = []
    if theirs:
        k = theirs[0].get("kernel") or {}
        base = Kernel(
            str(k.get("commit", "")),
            str(k.get("kernelrelease", "")),
            str(report.get("compare") or ""),
        )
        if recorded_base and base.commit and base.commit != recorded_base:
            warnings.append(
                f"the base tested, {base.commit[:12]}, is not the series' base {recorded_base[:12]}"
            )
    else:
        warnings.append("no base kernel in the report (test-remote without --compare)")
    names = list(dict.fromkeys([*(report.get("boxes") or []), *(r.get("box") for r in runs)]))
    boxes = _boxes(names, runs, set(pointer.get("local_qemu") or []))
    unread = [b.name for b in boxes if not _kvm(runs, b.name)]
    if unread:
        warnings.append(
            f"the report does not say which MMU and CPU {', '.join(unread)} ran (a test-remote "
            "from before it read them from the box): test again to have them"
        )
    gates, failures = [], []
    for name, gate in (check.get("gates") or {}).items():
        if gate.get("tip") != tip:
            continue
        if gate.get("failed"):
            failures.append(f"check gate {name} failed on {len(gate['failed'])} commit(s)")
        else:
            gates.append(Gate(name, str(gate.get("description", ""))))
    if not gates and not failures:
        warnings.append(f"no `invoke check` record of {tip[:12]}: the section names no gates")
    if not mine:
        failures.append("the report has no run of the series kernel")
    failures += [
        f"{r.get('box')} ({r.get('kernel', {}).get('kernelrelease', '?')}): {r.get('verdict')}"
        + (f": {r['reason']}" if r.get("reason") else "")
        for r in mine
        if r.get("verdict") != "pass"
    ]
    return Evidence(
        report=path,
        series=series,
        base=base,
        boxes=tuple(boxes),
        outcomes=tuple(_outcomes(report, runs, boxes, bool(base))),
        soaks=tuple(_soaks(report.get("soak_report") or {})),
        gates=tuple(gates),
        builds=tuple(
            Build(
                str(b.get("series")),
                str(b.get("commit")),
                b.get("patches"),
                b.get("branch") == branch,
            )
            for b in report.get("series_builds") or []
        ),
        matrices=tuple(_matrices(runs, boxes)),
        intel=any(b.intel for b in boxes),
        real_hardware=any(not b.qemu for b in boxes),
        failures=tuple(failures),
        warnings=tuple(warnings),
    )


def _kvm(runs: list[dict[str, Any]], box: str) -> dict[str, Any]:
    """What test-remote read from the box's /sys and /proc/cpuinfo (the series run's first)."""
    for run in sorted(runs, key=lambda r: r.get("label") != SERIES):
        if run.get("box") == box and isinstance(run.get("kvm"), dict):
            return run["kvm"]
    return {}


def _boxes(names: list[str], runs: list[dict[str, Any]], local_qemu: set[str]) -> list[Box]:
    found = []
    for name in names:
        kvm = _kvm(runs, name)
        mmu = str(kvm.get("mmu") or "") or _program_mmu(runs, name)
        params = dict(kvm.get("params") or {})
        # Both vendor modules may be built in, so kvm_intel's ept is in sysfs on an AMD CPU
        # too; "npt" is set exactly when kvm_amd is the vendor module that ran
        # (kseries/testbox/mmu.py), so an MMU read with no npt came from kvm_intel.
        intel = mmu != UNKNOWN and kvm.get("npt") is None and "kvm_intel.ept" in params
        found.append((name, str(kvm.get("cpu") or ""), mmu, params, intel))
    mmus = [mmu for _, _, mmu, _, _ in found]
    return [
        Box(
            name,
            cpu,
            mmu,
            params,
            mmu if mmu != UNKNOWN and mmus.count(mmu) == 1 else name,
            name in local_qemu,
            intel,
        )
        for name, cpu, mmu, params, intel in found
    ]


def _program_mmu(runs: list[dict[str, Any]], box: str) -> str:
    """The MMU a test program on the box reported, for a report without the run's own record."""
    for run in runs:
        if run.get("box") == box:
            for test in run.get("tests") or []:
                said = (test.get("metrics") or {}).get("mmu")
                if said in PROGRAM_MMU:
                    return PROGRAM_MMU[said]
    return UNKNOWN


def _outcomes(
    report: dict[str, Any], runs: list[dict[str, Any]], boxes: list[Box], with_base: bool
) -> Iterable[Outcome]:
    """Per test: the boxes grouped by their (base, series) statuses, in the report's order."""
    tests = list(report.get("tests") or [])
    tests += [t["name"] for r in runs for t in r.get("tests") or [] if t["name"] not in tests]
    for test in tests:
        groups: dict[tuple[str, str], list[str]] = {}
        for box in boxes:
            mine = [r for r in runs if r.get("box") == box.name]
            base = [r for r in mine if r.get("label") != SERIES]
            key = (
                _status(base[0] if base else None, test) if with_base else "",
                _status(next((r for r in mine if r.get("label") == SERIES), None), test),
            )
            groups.setdefault(key, []).append(box.label)
        for (base_status, series_status), labels in groups.items():
            yield Outcome(test, base_status, series_status, tuple(labels))


def _status(run: dict[str, Any] | None, test: str) -> str:
    """PASS, FAIL, SKIP, timeout, error; a run that never got to its tests, its verdict."""
    if run is None:
        return "not run"
    for result in run.get("tests") or []:
        if result.get("name") == test:
            status = str(result.get("status", "?"))
            return status.upper() if status in ("pass", "fail", "skip") else status
    return str(run.get("verdict") or "not run")


def _matrices(runs: list[dict[str, Any]], boxes: list[Box]) -> Iterable[Matrix]:
    """Per matrix test and box, its cells' figures on each kernel (base first)."""
    for box in boxes:
        mine = sorted(
            (r for r in runs if r.get("box") == box.name), key=lambda r: r.get("label") == SERIES
        )
        found: dict[str, list[MatrixRow]] = {}
        for run in mine:
            for test in run.get("tests") or []:
                if not test.get("cells"):
                    continue
                metrics, shown = test.get("metrics") or {}, test.get("shown") or []
                cells = tuple(
                    Cell(
                        cell,
                        tuple(
                            (k[len(cell) + 1 :], str(metrics[k]))
                            for k in shown
                            if k.startswith(f"{cell}_") and k in metrics
                        ),
                    )
                    for cell in test["cells"]
                )
                kernel = "series" if run.get("label") == SERIES else "base"
                found.setdefault(test["name"], []).append(
                    MatrixRow(kernel, _status(run, test["name"]), cells)
                )
        for test_name, rows in found.items():
            yield Matrix(test_name, box.name, tuple(rows))


def _soaks(soak_report: dict[str, list[dict[str, Any]]]) -> Iterable[Soak]:
    """Per soak test and kernel, the report's own "all boxes" sums (or its one box's row)."""
    for test, rows in soak_report.items():
        for label in sorted(
            dict.fromkeys(r.get("kernel") for r in rows), key=lambda k: k == SERIES
        ):
            mine = [r for r in rows if r.get("kernel") == label and r.get("box") != "all boxes"]
            total = next(
                (r for r in rows if r.get("kernel") == label and r.get("box") == "all boxes"),
                mine[0],
            )
            figures = {k: v for k, v in total.items() if k not in SOAK_KEYS and v != "-"}
            yield Soak(test, "series" if label == SERIES else "base", len(mine), figures)


# --- the cover letter -------------------------------------------------------------------------


@dataclass(frozen=True)
class Testing:
    """The evidence, and the cover letter's body without and with its Testing section."""

    evidence: Evidence
    plain: str  # as `invoke rebase` put it in the branch description, which format-patch uses
    full: str

    def splice(self, cover: Path) -> None:
        """Put the section into the cover letter format-patch wrote at `cover`."""
        text = cover.read_text()
        if text.count(self.plain) != 1:
            raise ToolkitError(
                f"{cover}: the cover letter does not hold the branch description's text",
                "run `invoke rebase` again, which sets the description",
            )
        cover.write_text(text.replace(self.plain, self.full))


def prepare(tree: WorkTree, series: Series) -> Testing:
    """The evidence and the cover letter with it, checked before anything is written: refused
    when the branch description is not what the cover template renders now (the section would
    land in a letter no template says), or when the template has no place for the section."""
    evidence = find(tree, series)
    from kseries.changelog import Changelog  # jinja2, only for a letter that gets the section

    changelog = Changelog(series)
    plain = changelog.cover_letter().body
    template = series.templates_dir / series.cover_template
    description = tree.try_git("config", f"branch.{series.branch}.description")[1]
    if description.partition("\n\n")[2].strip("\n") != plain:
        raise ToolkitError(
            f"the cover letter in {series.branch}'s description is not what {template} renders "
            "now (it changed since `invoke rebase`)",
            "run `invoke rebase`, which renders it again (new commits: test them again), or "
            "add --untested to send the description as it is",
        )
    full = changelog.cover_letter(evidence=evidence).body
    if full == plain:
        raise ToolkitError(
            f"{template} has no place for the Testing section",
            'add {% include "cover-testing.j2" %} where it goes, or add --untested',
        )
    return Testing(evidence, plain, full)
