"""A sent version: the change-id in its cover letter, its record and `sent/` tag, and the
checks that hold the next version to what was sent.

A patch's fingerprint is what reviewers' trailers are about: `git patch-id --stable` of its
diff (whitespace and line numbers aside, as git itself compares patches) and a digest of its
message without the trailer block (a new Reviewed-by is not a change). The record keeps them
per patch, so "changed since v2" needs neither the old branch nor the network.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kseries.config import Config
from kseries.core.run import run
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.review.data import Edit, Sent, SentPatch, archive
from kseries.series import DIFF_OPTIONS, Series, load

if TYPE_CHECKING:
    from kseries.send import Outbox

TAG_PREFIX = "sent/"  # b4's: sent/<branch>
TRAILER_LINE = re.compile(r"^[A-Za-z0-9-]+: \S")


def tag_name(branch: str) -> str:
    return f"{TAG_PREFIX}{branch}"


def prose_digest(message: str) -> str:
    """A commit message's digest without its trailer block (the last paragraph, when every
    line of it is a `Key: value` trailer)."""
    paragraphs = message.strip().split("\n\n")
    if len(paragraphs) > 1 and all(TRAILER_LINE.match(x) for x in paragraphs[-1].splitlines()):
        paragraphs = paragraphs[:-1]
    return hashlib.sha256("\n\n".join(paragraphs).encode()).hexdigest()


def patch_id(diff: str) -> str:
    """`git patch-id --stable` of one diff (empty for an empty one)."""
    out = run(["git", "patch-id", "--stable"], input=diff).stdout.split()
    return out[0] if out else ""


@dataclass(frozen=True)
class Fingerprint:
    subject: str
    patch_id: str
    prose: str


def branch_fingerprints(tree: WorkTree, base: str, tip: str) -> list[tuple[str, Fingerprint]]:
    """(commit, fingerprint) of each commit of base..tip, oldest first: two git calls."""
    log = tree.git("log", "--reverse", "--format=%H%x00%s%x00%B%x01", f"{base}..{tip}")
    commits = [e.strip("\n").split("\0") for e in log.split("\x01") if e.strip()]
    ids: dict[str, str] = {}
    if commits:
        patches = tree.git(
            *DIFF_OPTIONS, "log", "-p", "--no-color", "--format=commit %H", f"{base}..{tip}"
        )
        for line in run(["git", "patch-id", "--stable"], input=patches).stdout.splitlines():
            pid, sha = line.split()
            ids[sha] = pid
    return [
        (sha, Fingerprint(subject, ids.get(sha, ""), prose_digest(body)))
        for sha, subject, body in commits
    ]


def data_fingerprints(series: Series) -> list[Fingerprint]:
    """The fingerprint of each patch as the data says it (templates/ and patches/)."""
    from kseries.changelog import Changelog

    writer = Changelog(series)
    prints = []
    for patch in series.patches:
        message = writer.message(patch)
        prints.append(
            Fingerprint(
                message.subject, patch_id(patch.diff.read_text()), prose_digest(str(message))
            )
        )
    return prints


def changed(sent: Sent, now: list[Fingerprint]) -> dict[int, str]:
    """Patch number -> what changed ("diff", "message", "diff and message", "new") since `sent`."""
    found = {}
    for number, current in enumerate(now, start=1):
        if number > len(sent.patches):
            found[number] = "new"
            continue
        then = sent.patches[number - 1]
        what = [
            name
            for name, differs in (
                ("diff", then.patch_id != current.patch_id),
                ("message", then.prose != current.prose),
            )
            if differs
        ]
        if what:
            found[number] = " and ".join(what)
    return found


def previous(series: Series) -> Sent | None:
    """The newest sent version before the current one."""
    earlier = [s for s in series.sent if s.version < series.version]
    return earlier[-1] if earlier else None


def recorded(series: Series) -> Sent | None:
    """The current version's record, if it was sent."""
    return next((s for s in series.sent if s.version == series.version), None)


# --- at send time -------------------------------------------------------------------------------


def stamp_change_id(cover: Path, change_id: str) -> None:
    """Put b4's `change-id:` line under format-patch's `base-commit:` in the cover letter,
    where b4 writes it and reads it back."""
    if not change_id:
        return
    text = cover.read_text()
    if f"\nchange-id: {change_id}\n" in text:
        return
    text, count = re.subn(
        r"^(base-commit: [0-9a-f]+)$", rf"\1\nchange-id: {change_id}", text, count=1, flags=re.M
    )
    if not count:
        text = text.rstrip("\n") + f"\n\nchange-id: {change_id}\n"
    cover.write_text(text)


def link(archive: str, message_id: str) -> str:
    return f"{archive.rstrip('/')}/{message_id}/"


def build_record(
    tree: WorkTree,
    series: Series,
    *,
    base: str,
    cover_id: str,
    patch_ids: list[str],
    to: list[str],
    cc: list[str],
    archive: str,
) -> Sent:
    """The record of sending the series branch as it is now, with these Message-IDs."""
    tip = tree.git("rev-parse", series.branch).strip()
    prints = branch_fingerprints(tree, base, tip)
    if len(prints) != len(patch_ids):
        raise ToolkitError(
            f"{series.branch} has {len(prints)} commits on {base[:12]} but {len(patch_ids)} "
            "patch mails were sent",
            "the branch moved during the send: record it by hand or send again",
        )
    return Sent(
        version=series.version,
        branch=series.branch,
        date=email.utils.format_datetime(
            datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        ),
        base=base,
        tip=tip,
        tag=tag_name(series.branch),
        change_id=series.change_id,
        cover=cover_id,
        link=link(archive, cover_id),
        to=tuple(to),
        cc=tuple(cc),
        patches=tuple(
            SentPatch(mid, fp.subject, fp.patch_id, fp.prose)
            for mid, (_, fp) in zip(patch_ids, prints, strict=True)
        ),
    )


def tag(tree: WorkTree, series: Series, record: Sent, cover_text: str) -> None:
    """The annotated `sent/<branch>` tag on the sent tip, its message the cover letter with
    `base-commit:`, `change-id:` and a Link, as b4's sent tags carry them."""
    message = (
        f"{cover_text.strip()}\n\nbase-commit: {record.base}\n"
        + (f"change-id: {record.change_id}\n" if record.change_id else "")
        + f"Link: {record.link}\n"
    )
    tree.git(
        "tag", "-a", "-F", "-", record.tag, record.tip, env=series.committer_env, stdin=message
    )


def record_send(
    config: Config, tree: WorkTree, series: Series, outbox: Outbox, *, dry_run: bool
) -> list[str]:
    """After every mail went out: the `sent/` tag and the [[sent]] record (the tag is taken
    back if the record cannot be written). A dry run only says what a send would record."""
    cover, patches = outbox.mails[0], outbox.mails[1:]
    record = build_record(
        tree,
        series,
        base=outbox.base,
        cover_id=cover.message_id,
        patch_ids=[m.message_id for m in patches],
        to=cover.to,
        cc=cover.cc,
        archive=archive(config)[0],
    )
    if not dry_run:
        description = tree.try_git("config", f"branch.{series.branch}.description")[1]
        tag(tree, series, record, description or cover.subject)
        edit = Edit(config)
        edit.add_sent(record)
        try:
            edit.write(load)
        except BaseException:
            tree.try_git("tag", "-d", record.tag)
            raise
    return describe(record, tagged=not dry_run)


def describe(record: Sent, tagged: bool) -> list[str]:
    """The record in a few lines: what the send wrote, or what a dry run would."""
    return [
        f"v{record.version} {record.branch} at {record.tip[:12]} on {record.base[:12]}, "
        f"{len(record.patches)} patches, {record.date}",
        f"  tag {record.tag}" + ("" if tagged else " (not made: dry run)"),
        f"  cover {record.cover} -> {record.link}",
        f"  to {len(record.to)}, cc {len(record.cc)}; change-id {record.change_id or '(none)'}",
    ]


# --- pre-send checks ----------------------------------------------------------------------------

Verdict = tuple[str, bool, str, bool]  # name, ok, detail, warn: send.py makes a MailCheck of it


def not_sent_before(tree: WorkTree, series: Series, *, sending: bool) -> Verdict:
    """A version goes out once: its record and tag exist after the send. A dry run warns."""
    name = f"v{series.version} not sent before"
    done = recorded(series)
    tagged = tree.rev(f"refs/tags/{tag_name(series.branch)}")
    if not done and not tagged:
        return (name, True, "", False)
    detail = (
        f"v{series.version} was sent on {done.date} ({done.link})"
        if done
        else f"the tree has the tag {tag_name(series.branch)}"
    ) + "; start the next with `invoke new-version`"
    return (name, not sending, detail, True)


def changes_named(tree: WorkTree, series: Series, base: str, cover_text: str) -> Verdict | None:
    """From v2 on: the cover letter's "Changes since vN:" names every patch whose diff or
    message changed since vN was sent (None when no earlier version was recorded)."""
    before = previous(series)
    if before is None:
        return None
    name = f"Changes since v{before.version} names every changed patch"
    now = [fp for _, fp in branch_fingerprints(tree, base, series.branch)]
    moved = changed(before, now)
    section = changes_section(cover_text, before.version)
    template = f"templates/changes-since-v{before.version}.j2"
    if section is None:
        if not moved:
            return (name, True, f"nothing changed since v{before.version}", False)
        return (
            name,
            False,
            f"the cover letter has no 'Changes since v{before.version}:' section; write "
            f"{template} naming {describe_changed(moved)}, then `invoke rebase`",
            False,
        )
    missing = {n: w for n, w in moved.items() if not names_patch(section, n, now[n - 1].subject)}
    if missing:
        return (
            name,
            False,
            f"not named in it: {describe_changed(missing)} (write 'patch N' or the subject in "
            f"{template}, then `invoke rebase`)",
            False,
        )
    return (name, True, describe_changed(moved) or "no patch changed", False)


def describe_changed(moved: dict[int, str]) -> str:
    return ", ".join(f"patch {n} ({what})" for n, what in sorted(moved.items()))


def changes_section(text: str, version: int) -> str | None:
    """The lines under `Changes since vN:` up to the next paragraph that is not a list."""
    lines = text.splitlines()
    heading = re.compile(rf"^changes since v{version}\s*:?\s*$", re.I)
    start = next((i for i, line in enumerate(lines) if heading.match(line.strip())), None)
    if start is None:
        return None
    body = []
    for line in lines[start + 1 :]:
        if line and not line[0].isspace() and not line.startswith(("-", "*")):
            break
        body.append(line)
    return "\n".join(body)


def names_patch(section: str, number: int, subject: str) -> bool:
    """`patch N`, `patches N and M`, `N/T`, or the patch's summary (after its prefix)."""
    for listing in re.finditer(r"\bpatch(?:es)?\s+((?:\d+\s*(?:,|and|&|-)?\s*)+)", section, re.I):
        if str(number) in re.findall(r"\d+", listing.group(1)):
            return True
    if re.search(rf"(?<![\d/]){number}/\d+\b", section):
        return True
    summary = subject.split(": ")[-1].strip().lower()
    flat = " ".join(section.lower().split())
    return bool(summary) and summary in flat
