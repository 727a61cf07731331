"""`invoke status`: where the series stands, in one screen, from what the stages left.

The version and branch (configs/), what was sent and when (configs/review.toml and the
`sent/` tags), trailers applied and harvested but not applied (`invoke trailers` saves each
harvest under out/review/), whether the branch is what the data renders, and the last
check, build and test-remote verdicts, each shown only if it was for the branch's exact tip.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kseries.core.files import write_atomic
from kseries.gitrepo import WorkTree
from kseries.records import DIR
from kseries.review import harvest as harvest_stage
from kseries.review import sent as sent_stage
from kseries.series import Series, commit_diff


def harvest_file(series: Series, version: int, out: Path) -> Path:
    """Where `invoke trailers` keeps the last harvest of a version's replies."""
    return out / "review" / f"{series.name}-v{version}.json"


def check_record(tree: WorkTree) -> Path:
    return tree.git_path(f"{DIR}/last-check.json")


def record_check(tree: WorkTree, branch: str, results: list[Any]) -> None:
    """What `invoke check` concluded, keyed on the tip of the branch it checked (a gate that
    stopped at a failing commit still speaks for the tip)."""
    tip = tree.rev(f"refs/heads/{branch}")
    if not results or tip is None:
        return
    gates: dict[str, bool] = {}
    for r in results:
        gates[r.gate] = gates.get(r.gate, True) and r.ok
    body = {"tip": tip, "gates": gates, "at": time.time()}
    write_atomic(check_record(tree), json.dumps(body, indent=2) + "\n")


@dataclass
class Status:
    lines: list[str] = field(default_factory=list)

    def add(self, heading: str, *rows: str) -> None:
        self.lines.append(heading)
        self.lines += [f"  {r}" for r in rows]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def status(series: Series, tree: WorkTree | None, out: Path, test_reports: Path) -> Status:
    shown = Status()
    tip = tree.rev(f"refs/heads/{series.branch}") if tree else None
    shown.add(
        f"{series.name} v{series.version}: branch {series.branch} "
        + (f"at {tip[:12]}" if tip else "(not made yet: invoke rebase)"),
        f"change-id {series.change_id or '(none)'}",
    )
    _sent(shown, series, tree)
    _trailers(shown, series, out)
    if tree is not None and tip:
        _matches(shown, series, tree, tip)
        _verdicts(shown, tree, tip, test_reports)
    return shown


def _sent(shown: Status, series: Series, tree: WorkTree | None) -> None:
    if not series.sent:
        shown.add("sent: nothing yet (invoke send-series --send records each version)")
        return
    rows = []
    for s in series.sent:
        tagged = "" if tree is None or tree.rev(f"refs/tags/{s.tag}") else " (tag not in tree)"
        rows.append(
            f"v{s.version} on {s.date}: {len(s.patches)} patches to {len(s.to)}, cc {len(s.cc)}; "
            f"{s.tag}{tagged}; {s.link}"
        )
    shown.add("sent:", *rows)


def _trailers(shown: Status, series: Series, out: Path) -> None:
    applied = [
        f"patch {g.patch} {g.key}: {series.people[g.person].ident} (v{g.version}, {g.message_id})"
        for g in series.given
    ]
    shown.add(f"trailers applied from replies: {len(applied)}", *applied)
    pending = []
    for sent in series.sent:
        path = harvest_file(series, sent.version, out)
        if not path.is_file():
            continue
        saved = harvest_stage.read_saved(json.loads(path.read_text()))
        moved = sent_stage.changed(sent, sent_stage.data_fingerprints(series))
        pending += [
            f"patch {r.found.patch} {r.found.key}: {r.found.value} ({r.state}, "
            f"{r.found.message_id})"
            for r in harvest_stage.classify(saved, series, sent, moved)
            if r.state in (harvest_stage.NEW, harvest_stage.CHANGED)
        ]
    shown.add(
        f"trailers collected, not applied: {len(pending)}"
        + (" (invoke trailers --apply)" if pending else ""),
        *pending,
    )


def _matches(shown: Status, series: Series, tree: WorkTree, tip: str) -> None:
    """The branch against the data: each commit's diff and message as they render now."""
    from kseries import records
    from kseries.changelog import Changelog

    base = (
        records.recorded_base(tree, series.branch)
        or tree.git("merge-base", tip, series.base.tracking_ref).strip()
    )
    commits = tree.git("rev-list", "--reverse", f"{base}..{tip}").split()
    if len(commits) != len(series.patches):
        shown.add(
            f"branch vs data: {len(commits)} commits, the data has {len(series.patches)} "
            "patches (invoke rebase)"
        )
        return
    writer = Changelog(series)
    differ = []
    for sha, patch in zip(commits, series.patches, strict=True):
        diff = commit_diff(tree, sha)
        message = tree.git("show", "-s", "--format=%B", sha)
        what = [
            name
            for name, same in (
                ("diff", diff == patch.diff.read_text()),
                ("message", message.strip() == str(writer.message(patch)).strip()),
            )
            if not same
        ]
        if what:
            differ.append(f"{patch.label}: {' and '.join(what)} differ")
    shown.add(
        "branch vs data: " + ("matches" if not differ else "differs (invoke rebase, or export)"),
        *differ,
    )


def _verdicts(shown: Status, tree: WorkTree, tip: str, test_reports: Path) -> None:
    rows = []
    path = check_record(tree)
    check = json.loads(path.read_text()) if path.is_file() else None
    if check and check.get("tip") == tip:
        rows.append(
            "check: "
            + ", ".join(f"{g} {'ok' if ok else 'FAIL'}" for g, ok in check["gates"].items())
        )
    else:
        rows.append("check: not run on this tip (invoke check)")
    rows.append(_build(tip))
    rows.append(_tests(tip, test_reports))
    shown.add(f"verdicts for {tip[:12]}:", *rows)


def _build(tip: str) -> str:
    from kseries.build.manifest import last_build
    from kseries.errors import ToolkitError

    try:
        manifest = last_build()
    except ToolkitError:
        return "build: none yet (invoke build)"
    if manifest.commit != tip or manifest.dirty:
        return f"build: the last one is of {manifest.commit[:12]}, not this tip (invoke build)"
    return f"build: {manifest.kernelrelease}, {manifest.path}"


def _tests(tip: str, reports: Path) -> str:
    """The newest test-remote report whose kernel under test is this tip."""
    for report in sorted(reports.glob("*/report.json"), reverse=True):
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            continue
        if (data.get("kernel") or {}).get("commit") != tip:
            continue
        runs = ", ".join(f"{r['box']}/{r['label']} {r['verdict']}" for r in data.get("runs", []))
        return f"test-remote: {runs} ({report.parent.name})"
    return "test-remote: not run on this tip (invoke test-remote)"
