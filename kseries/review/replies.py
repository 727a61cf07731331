"""`invoke trailers`: read a sent version's replies, show their trailers, apply them.

The harvest (kseries.review.harvest) is saved under out/review/ for `invoke status`; applying
writes configs/ through one `Edit`, so a refusal or failure leaves configs/ as it was.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from kseries import series as series_stage
from kseries.config import Config
from kseries.core.files import write_atomic
from kseries.errors import ToolkitError
from kseries.review import harvest as harvest_stage
from kseries.review import sent as sent_stage
from kseries.review.data import Edit, Sent, archive
from kseries.review.status import harvest_file
from kseries.series import Series


@dataclass(frozen=True)
class Collected:
    series: Series
    sent: Sent
    source: str  # the mbox file or the thread's URL
    harvest: harvest_stage.Harvest
    rows: list[harvest_stage.Row]
    moved: dict[int, str]


def pick(series: Series, version: int) -> Sent:
    """The sent record whose replies to read: `version`'s, else the newest."""
    if not series.sent:
        raise ToolkitError(
            f"{series.source.parent / 'review.toml'}: no version of the series was sent",
            "trailers come from replies to a sent version: invoke send-series --send first",
        )
    if not version:
        return series.sent[-1]
    for sent in series.sent:
        if sent.version == version:
            return sent
    raise ToolkitError(
        f"v{version} was not sent",
        "sent versions: " + ", ".join(f"v{s.version}" for s in series.sent),
    )


def collect(
    config: Config, series: Series, *, mbox: Path | None, url: str, version: int
) -> Collected:
    sent = pick(series, version)
    if mbox is not None:
        mails, source = harvest_stage.read_mbox(mbox), str(mbox)
    else:
        where, timeout = archive(config)
        where = url or where
        source = harvest_stage.thread_url(where, sent.cover)
        with tempfile.TemporaryDirectory(prefix="kseries-thread-") as scratch:
            mails = harvest_stage.fetch(where, sent.cover, timeout, Path(scratch) / "t.mbox")
    harvest = harvest_stage.harvest(mails, sent)
    moved = sent_stage.changed(sent, sent_stage.data_fingerprints(series))
    rows = harvest_stage.classify(harvest, series, sent, moved)
    out = harvest_file(series, sent.version, config.project / "out")
    write_atomic(out, json.dumps({"source": source, **harvest.to_json()}, indent=2) + "\n")
    return Collected(series, sent, source, harvest, rows, moved)


def table(found: Collected) -> Table:
    grid = Table(
        title=f"trailers in {found.harvest.replies} replies to v{found.sent.version} "
        f"({found.source})",
        title_justify="left",
    )
    for column in ("trailer", "person", "patch", "message-id", "state"):
        grid.add_column(column, no_wrap=column in ("trailer", "patch"))
    for row in found.rows:
        state = row.state + (f", {row.found.note}" if row.found.note else "")
        if row.state == harvest_stage.CHANGED and row.found.patch in found.moved:
            state += f" ({found.moved[row.found.patch]} since v{found.sent.version})"
        if row.person is None:
            state += ", new person"
        grid.add_row(
            row.found.key,
            escape(row.found.value),
            str(row.found.patch),
            escape(row.found.message_id),
            escape(state),
        )
    return grid


def notes(found: Collected) -> list[str]:
    """What was not taken and why, and the warnings reviewers would expect."""
    lines = [
        f"ignored: {s.reason}" + (f" ({s.message_id})" if s.message_id else "")
        for s in found.harvest.skipped
    ]
    changed = sorted({r.found.patch for r in found.rows if r.state == harvest_stage.CHANGED})
    for number in changed:
        what = found.moved.get(number, "it is gone")
        lines.append(
            f"warning: patch {number} changed since v{found.sent.version} ({what}): its "
            "trailers from that version are not applied unless --apply --changed-too "
            "(reviewers expect to be asked again)"
        )
    if not found.rows:
        lines.append("no trailers found")
    return lines


def apply(config: Config, found: Collected, *, changed_too: bool) -> list[str]:
    edit = Edit(config)
    taken = harvest_stage.apply(edit, found.series, found.sent, found.rows, changed_too)
    if not taken:
        return ["nothing to apply"]
    edit.write(series_stage.load)
    where = ", ".join(str(p.relative_to(config.project)) for p in edit.docs)
    return [
        f"applied {len(taken)} trailers into {where}",
        *(f"  patch {r.found.patch} {r.found.key}: {r.found.value}" for r in taken),
    ]
