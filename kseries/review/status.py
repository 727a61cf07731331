"""`invoke status`: where the series stands, in one screen, from what the stages left.

The version and branch (configs/), what was sent and when (configs/review.toml and the
`sent/` tags), trailers applied and harvested but not applied (`invoke trailers` saves each
harvest under out/review/), whether the branch is what the data renders, and the last
check, build and test-remote verdicts, each shown only if it was for the branch's exact tip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kseries import records
from kseries.gitrepo import WorkTree
from kseries.review import harvest as harvest_stage
from kseries.review import sent as sent_stage
from kseries.series import Series, commit_diff


def harvest_file(series: Series, version: int, out: Path) -> Path:
    """Where `invoke trailers` keeps the last harvest of a version's replies."""
    return out / "review" / f"{series.name}-v{version}.json"


@dataclass
class Status:
    lines: list[str] = field(default_factory=list)

    def add(self, heading: str, *rows: str) -> None:
        self.lines.append(heading)
        self.lines += [f"  {r}" for r in rows]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def status(series: Series, tree: WorkTree | None, out: Path) -> Status:
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
        _verdicts(shown, tree, series.branch, tip)
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

    base = records.series_base(tree, series.branch, series.base.tracking_ref)
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


def _verdicts(shown: Status, tree: WorkTree, branch: str, tip: str) -> None:
    """From the records the check and test-remote stages keep per branch (kseries.records),
    each shown only if it speaks for this tip."""
    rows = []
    check = records.read(records.check_record(tree, branch), "check record", "invoke check")
    gates = {
        name: not gate["failed"]
        for name, gate in ((check or {}).get("gates") or {}).items()
        if gate.get("tip") == tip
    }
    if gates:
        verdicts = (f"{g} {'ok' if ok else 'FAIL'}" for g, ok in gates.items())
        rows.append("check: " + ", ".join(verdicts))
    else:
        rows.append("check: not run on this tip (invoke check)")
    rows.append(_build(tip))
    rows.append(_tests(tree, branch, tip))
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


def _tests(tree: WorkTree, branch: str, tip: str) -> str:
    """The newest test-remote report of the branch, if its kernel under test is this tip."""
    pointer = records.read(
        records.report_pointer(tree, branch), "test-remote record", "invoke test-remote"
    )
    if not pointer or pointer.get("commit") != tip:
        return "test-remote: not run on this tip (invoke test-remote)"
    report = Path(pointer["report"])
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return f"test-remote: its report {report} is gone or damaged (invoke test-remote)"
    runs = ", ".join(f"{r['box']}/{r['label']} {r['verdict']}" for r in data.get("runs", []))
    return f"test-remote: {runs} ({report.parent.name})"
