"""What a test-remote run concluded, per box and kernel: the verdict table on the terminal, and
report.json plus junit.xml in the output directory (next to each run's console log, dmesg and
test output).

A run's verdict is one of:
  pass          the kernel was proven and every test passed or skipped, no splat in dmesg;
  fail          a test failed or timed out, or dmesg has a splat;
  wrong kernel  the box answered but is not running this build (tests were not run);
  boot failed   the box did not come back on the new kernel (it was brought back);
  unreachable   the box did not answer before the boot (a lava box: the server did not);
  infra error   the LAVA lab failed the job itself (not a test result);
  error         something else stopped the run (an upload, a build of a test, ...).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from kseries.testbox.mmu import Kvm
from kseries.testbox.runner import Splat, TestResult
from kseries.testbox.trace import Trace

# The column label of the kernel under test; a --compare reference is labelled "ref REF".
UNDER_TEST = "kernel"

STYLE = {
    "pass": "green",
    "skip": "yellow",
    "fail": "bold red",
    "timeout": "bold red",
    "error": "bold red",
    "wrong kernel": "bold red",
    "boot failed": "bold red",
    "unreachable": "bold red",
    "infra error": "bold magenta",
}


@dataclass
class Run:
    """One kernel on one box."""

    box: str
    label: str  # which kernel, as the table's column header says it ("series", "base", ...)
    kernel: dict[str, Any]
    verdict: str = "error"
    reason: str = ""
    before: dict[str, str] | None = None
    after: dict[str, str] | None = None
    tests: list[TestResult] = field(default_factory=list)
    splats: list[Splat] = field(default_factory=list)
    console_tail: list[str] = field(default_factory=list)
    recovery: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    directory: Path | None = None
    trace: Trace | None = None  # with --trace: what the fault-path probes saw
    kvm: Kvm | None = None  # the MMU and CPU the box showed after the boot

    def conclude(self) -> None:
        """Set pass/fail from the tests, the splats and the MMU (for a run that got that far):
        a box that does not show the KVM parameters it claims did not test what it says."""
        bad = [t for t in self.tests if t.status in ("fail", "timeout", "error")]
        if self.kvm and self.kvm.mismatches:
            self.verdict = "fail"
            self.reason = f"box {self.box} " + "; ".join(self.kvm.mismatches)
        elif self.splats:
            self.verdict = "fail"
            self.reason = f"{len(self.splats)} splat(s) in dmesg: {self.splats[0].line.strip()}"
        elif bad:
            self.verdict = "fail"
            self.reason = ", ".join(f"{t.name} {t.status}" for t in bad)
        else:
            self.verdict = "pass"

    def save(self, directory: Path) -> None:
        """run.json beside the run's other files, written however the run ended."""
        (directory / "run.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @property
    def outcome(self) -> str:
        """The progress line a finished run prints: its label, verdict and reason."""
        return f"{self.label}: {self.verdict}" + (f": {self.reason}" if self.reason else "")

    def to_json(self) -> dict[str, Any]:
        kvm = {"kvm": self.kvm.to_json()} if self.kvm else {}  # absent: never read
        return {
            "box": self.box,
            "label": self.label,
            "verdict": self.verdict,
            "reason": self.reason,
            "kernel": self.kernel,
            "identity_before": self.before,
            "identity_after": self.after,
            "tests": [t.to_json() for t in self.tests],
            "dmesg_splats": [s.to_json() for s in self.splats],
            "console_tail": self.console_tail,
            "recovery": self.recovery,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "files": self.files,
            "trace": self.trace.to_json() if self.trace else None,
        } | kvm


def overall(runs: Sequence[Run], *, reference_may_fail: bool = False) -> bool:
    """Whether the whole invocation succeeded: every run passed; with --compare, only the
    runs of the kernel under test have to (the reference is expected to fail the new test)."""
    return all(r.verdict == "pass" for r in runs if r.label == UNDER_TEST or not reference_may_fail)


def table(runs: Sequence[Run]) -> Table:
    """Rows: boot/identity, each test, dmesg. Columns: each box and kernel, side by side."""
    grid = Table(title="test-remote verdicts", title_justify="left")
    grid.add_column("")
    for run in runs:
        grid.add_column(f"{run.box}\n{run.label}", justify="center")
    names: list[str] = []
    for run in runs:
        names += [t.name for t in run.tests if t.name not in names]

    def cell(status: str, extra: str = "") -> str:
        style = STYLE.get(status, "")
        text = status.upper() if status in ("pass", "fail", "skip") else status
        return f"[{style}]{text}[/]{extra}" if style else text

    boot_row = []
    for run in runs:
        if run.verdict in ("boot failed", "wrong kernel", "unreachable", "infra error"):
            boot_row.append(cell(run.verdict))
        elif run.after:
            boot_row.append(cell("pass", f" {run.timings.get('boot', 0):.1f}s"))
        else:
            boot_row.append(cell("error"))
    if any(run.kvm for run in runs):
        grid.add_row("MMU (read)", *(_mmu_cell(run.kvm) for run in runs))
        grid.add_row("CPU", *(run.kvm.cpu or "?" if run.kvm else "-" for run in runs))
    grid.add_row("boot + identity", *boot_row)
    for name in names:
        row = []
        for run in runs:
            found = next((t for t in run.tests if t.name == name), None)
            row.append(cell(found.status, f" {found.duration:.1f}s") if found else "-")
        grid.add_row(name, *row)
    grid.add_row(
        "dmesg",
        *(
            cell("fail", f" {len(r.splats)} splat(s)")
            if r.splats
            else (cell("pass") if r.after and r.verdict != "wrong kernel" else "-")
            for r in runs
        ),
    )
    grid.add_row("verdict", *(cell(r.verdict) for r in runs))
    return grid


def _mmu_cell(kvm: Kvm | None) -> str:
    if kvm is None:
        return "-"
    return kvm.mmu + ("\n[bold red]not as claimed[/]" if kvm.mismatches else "")


def soak_rows(runs: Sequence[Run]) -> dict[str, list[dict[str, Any]]]:
    """Per test that reports metrics: one row per box and kernel (the metrics its config lists,
    its status, the run's dmesg findings), then one "all boxes" row per kernel with the sums."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for test in run.tests:
            if not test.shown:
                continue
            row: dict[str, Any] = {"box": run.box, "kernel": run.label, "status": test.status}
            row |= {key: test.metrics.get(key, "-") for key in test.shown}
            row["dmesg"] = len(run.splats)
            merged.setdefault(test.name, []).append(row)
    for rows in merged.values():
        for label in dict.fromkeys(r["kernel"] for r in rows):
            mine = [r for r in rows if r["kernel"] == label]
            if len(mine) < 2:
                continue
            total: dict[str, Any] = {"box": "all boxes", "kernel": label}
            total["status"] = "/".join(
                f"{sum(r['status'] == s for r in mine)} {s}"
                for s in dict.fromkeys(r["status"] for r in mine)
            )
            total |= {k: _sum([r[k] for r in mine]) for k in mine[0] if k not in total}
            rows.append(total)
    return merged


def _sum(values: Sequence[Any]) -> Any:
    """Whole numbers add up as such, decimals to two places; anything else has no sum."""
    for kind in (int, float):
        try:
            total = sum(kind(v) for v in values)
        except (TypeError, ValueError):
            continue
        return total if kind is int else round(total, 2)
    return "-"


def matrix_tables(runs: Sequence[Run]) -> list[Table]:
    """One table per matrix test and box: a row per kernel, a column per cell, each cell its
    metrics (the kernel+VMM pair: base/series against stock/patched QEMU and the control)."""
    tables = []
    for box in dict.fromkeys(run.box for run in runs):
        found: dict[str, list[tuple[str, TestResult]]] = {}
        for run in (r for r in runs if r.box == box):
            for test in run.tests:
                if test.cells:
                    found.setdefault(test.name, []).append((run.label, test))
        for name, results in found.items():
            cells = results[0][1].cells
            grid = Table(title=f"{name} on {box}", title_justify="left")
            grid.add_column("")
            for cell in cells:
                grid.add_column(cell, justify="left")
            for label, test in results:
                row = []
                for cell in cells:
                    keys = [k for k in test.shown if k.startswith(f"{cell}_")]
                    lines = [f"{k[len(cell) + 1 :]} {test.metrics.get(k, '-')}" for k in keys]
                    row.append("\n".join(lines))
                grid.add_row(f"{label}\n{_styled(test.status)}", *row)
            tables.append(grid)
    return tables


def soak_tables(runs: Sequence[Run]) -> list[Table]:
    """One table per soak test, laid out like the verdict table: a column per box and kernel
    (and the "all boxes" sums), a row per metric. A matrix test has its own tables instead."""
    tables = []
    matrices = {t.name for run in runs for t in run.tests if t.cells}
    for name, rows in soak_rows(runs).items():
        if name in matrices:
            continue
        grid = Table(title=f"{name}: per box", title_justify="left")
        grid.add_column("")
        for row in rows:
            grid.add_column(f"{row['box']}\n{row['kernel']}", justify="right")
        for key in rows[0]:
            if key in ("box", "kernel"):
                continue
            cells = [str(row[key]) for row in rows]
            if key == "status":
                cells = [_styled(c) for c in cells]
            grid.add_row(key, *cells)
        tables.append(grid)
    return tables


def _styled(status: str) -> str:
    """A status as a report table shows it: upper case, in its colour (others as they are)."""
    return f"[{STYLE[status]}]{status.upper()}[/]" if status in STYLE else status


def details(runs: Sequence[Run]) -> list[str]:
    """The lines to print under the table: reasons, splats, console tails, where files are."""
    lines = []
    for run in runs:
        head = f"{run.box} ({run.label}, {run.kernel.get('kernelrelease', '?')} " + (
            f"{run.kernel.get('utsversion', '')}): {run.verdict}"
        )
        lines.append(head + (f": {run.reason}" if run.reason else ""))
        if run.kvm:
            lines += [f"  MMU: {m}" for m in run.kvm.mismatches if m not in run.reason]
        for splat in run.splats[:5]:
            lines.append(f"  dmesg:{splat.line_number}: {splat.line}")
            lines += [f"    {c}" for c in splat.context[:4]]
        for test in run.tests:
            if test.status in ("fail", "timeout", "error") and test.reason:
                lines.append(f"  {test.name}: {test.reason}")
        if run.trace:
            lines += [f"  {line}" for line in run.trace.lines()]
        if run.console_tail:
            lines.append("  last console lines:")
            lines += [f"    | {c}" for c in run.console_tail]
        if run.recovery:
            lines.append(f"  recovery: {run.recovery}")
        if run.directory:
            lines.append(f"  files: {run.directory}")
    return lines


def write(out: Path, runs: Sequence[Run], meta: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.json"
    soak = soak_rows(runs)
    merged = {"soak_report": soak} if soak else {}
    body = {**meta, **merged, "runs": [r.to_json() for r in runs]}
    report.write_text(json.dumps(body, indent=2) + "\n")
    junit = out / "junit.xml"
    ET.ElementTree(junit_tree(runs)).write(junit, encoding="unicode", xml_declaration=True)
    return report, junit


def junit_tree(runs: Sequence[Run]) -> ET.Element:
    suites = ET.Element("testsuites", name="kseries test-remote")
    for run in runs:
        suite = ET.SubElement(suites, "testsuite", name=f"{run.box}.{run.label}")
        cases: list[tuple[str, str, str, float, str]] = []
        boot_status = "pass" if run.after and run.verdict != "wrong kernel" else "fail"
        boot_reason = "" if boot_status == "pass" else f"{run.verdict}: {run.reason}"
        boot_out = "\n".join(run.console_tail)
        cases.append(("boot", boot_status, boot_reason, run.timings.get("boot", 0.0), boot_out))
        for test in run.tests:
            out = test.stdout + (f"\n--- stderr ---\n{test.stderr}" if test.stderr else "")
            cases.append((test.name, test.status, test.reason, test.duration, out))
        if run.after and run.verdict != "wrong kernel":
            splats = "\n".join(s.line for s in run.splats)
            cases.append(("dmesg", "fail" if run.splats else "pass", splats, 0.0, ""))
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for name, status, reason, duration, output in cases:
            case = ET.SubElement(
                suite,
                "testcase",
                name=name,
                classname=f"{run.box}.{run.label}",
                time=f"{duration:.3f}",
            )
            counts["tests"] += 1
            if status in ("fail", "timeout"):
                ET.SubElement(case, "failure", message=reason or status, type=status)
                counts["failures"] += 1
            elif status == "error":
                ET.SubElement(case, "error", message=reason or status)
                counts["errors"] += 1
            elif status == "skip":
                ET.SubElement(case, "skipped", message=reason)
                counts["skipped"] += 1
            if output:
                ET.SubElement(case, "system-out").text = output
        for key, value in counts.items():
            suite.set(key, str(value))
    return suites
