"""Trailers from the replies to a sent version: strict about what counts.

A trailer counts only when all of these hold, and every one that does not is listed with the
reason, never dropped silently:
- its mail is a reply in this thread: its In-Reply-To (or, without one, the last of its
  References) is the cover letter, a patch, or a mail that is itself such a reply; a mail
  that only mentions the thread in References, or replies to another version, is outside;
- it is the reviewer's own text: not quoted (`> Reviewed-by:`), not in the signature, not in
  a diff (the reply is read up to its first diff, `---` or `diff --git`), at the start of a
  line (a diff's context line ` Reviewed-by:` is indented);
- it is one of Reviewed-by, Acked-by, Tested-by, Reported-by, Suggested-by with exactly one
  well-formed "Name <address>".
A reply to a patch (or to a reply to it) gives that patch the trailer; a reply to the cover
letter gives it to every patch.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import mailbox
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from typing import cast

from kseries.errors import ToolkitError
from kseries.review.data import KEYS, Edit, Given, Sent, person_key
from kseries.series import Series, parse_ident

TRAILER = re.compile(rf"^({'|'.join(KEYS)}):[ \t]*(.*?)\s*$", re.I)
QUOTED = re.compile(r"^\s*>")
DIFF_START = re.compile(r"^(?:---\s*$|--- a/|\+\+\+ b/|diff --git |Index: |@@ -\d)")
MSGID = re.compile(r"<([^<>\s]+)>")
CANONICAL = {k.lower(): k for k in KEYS}


@dataclass(frozen=True)
class Found:
    """One trailer for one patch, from one reply."""

    key: str
    value: str  # "Name <address>", as written
    patch: int
    message_id: str
    sender: str
    note: str = ""  # e.g. given by someone else than the sender


@dataclass(frozen=True)
class Skipped:
    message_id: str
    reason: str


@dataclass
class Harvest:
    found: list[Found]
    skipped: list[Skipped]
    replies: int  # mails in the thread that are replies

    def to_json(self) -> dict:
        return {
            "found": [asdict(f) for f in self.found],
            "skipped": [asdict(s) for s in self.skipped],
            "replies": self.replies,
        }


def read_mbox(path: Path) -> list[EmailMessage | str]:
    """The mails of an mbox file; one that cannot be parsed is kept as its error text."""
    if not path.is_file():
        raise ToolkitError(f"--mbox {path}: no such file", "pass the mbox the replies are in")
    return _parse_mbox(path)


def _parse_mbox(path: Path) -> list[EmailMessage | str]:
    box = mailbox.mbox(path, factory=None, create=False)
    mails: list[EmailMessage | str] = []
    try:
        for key in box.iterkeys():
            try:
                raw = box.get_bytes(key)
                mails.append(
                    cast(EmailMessage, email.message_from_bytes(raw, policy=email.policy.default))
                )
            except Exception as e:  # a mail the parser cannot read is reported, not fatal
                mails.append(f"mail #{len(mails) + 1} of {path.name}: {type(e).__name__}: {e}")
    finally:
        box.close()
    if not mails:
        raise ToolkitError(f"{path}: no mails in it", "an mbox file starts with a 'From ' line")
    return mails


def thread_url(archive: str, message_id: str) -> str:
    """public-inbox's whole-thread mbox of a message: ARCHIVE/<msgid>/t.mbox.gz."""
    return f"{archive.rstrip('/')}/{urllib.parse.quote(message_id, safe='@!$&*+,;=:~')}/t.mbox.gz"


def fetch(archive: str, message_id: str, timeout: float, scratch: Path) -> list[EmailMessage | str]:
    """The thread of `message_id` from a public-inbox over HTTP (lore or another one)."""
    url = thread_url(archive, message_id)
    hint = (
        "check [review] archive in configs/ and the network, or save the thread and pass "
        "--mbox FILE"
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            body = answer.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise ToolkitError(
                f"{url}: the inbox has no thread for {message_id} (HTTP 404)",
                "the mails may not have reached the list yet; " + hint,
            ) from None
        raise ToolkitError(f"{url}: the inbox answered HTTP {e.code} {e.reason}", hint) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ToolkitError(f"{url}: the inbox did not answer: {reason}", hint) from None
    try:
        mbox = gzip.decompress(body)
    except (OSError, EOFError) as e:
        raise ToolkitError(f"{url}: not a gzipped mbox ({e})", hint) from None
    scratch.write_bytes(mbox)
    return _parse_mbox(scratch)


def _ids(value: object) -> list[str]:
    return MSGID.findall(str(value or ""))


def _parent(mail: EmailMessage) -> str | None:
    """What a mail replies to: In-Reply-To, else the last of its References."""
    replied = _ids(mail.get("In-Reply-To"))
    if replied:
        return replied[0]
    refs = _ids(mail.get("References"))
    return refs[-1] if refs else None


def harvest(mails: list[EmailMessage | str], sent: Sent) -> Harvest:
    """The trailers the replies to `sent` give, and every candidate that was not taken."""
    roots = {sent.cover: 0} | {p.message_id: n for n, p in enumerate(sent.patches, start=1)}
    skipped: list[Skipped] = []
    by_id: dict[str, EmailMessage] = {}
    for index, mail in enumerate(mails, start=1):
        if isinstance(mail, str):
            skipped.append(Skipped("", f"broken mail: {mail}"))
            continue
        ids = _ids(mail.get("Message-ID"))
        if not ids or not mail.get("From"):
            skipped.append(Skipped("", f"broken mail #{index}: no Message-ID or From header"))
            continue
        by_id.setdefault(ids[0], mail)
    # Walk replies down from the sent mails; a mail joins when its parent already has.
    of = dict(roots)
    grew = True
    while grew:
        grew = False
        for mid, mail in by_id.items():
            parent = _parent(mail)
            if mid not in of and parent in of:
                of[mid] = of[parent]
                grew = True
    found: list[Found] = []
    replies = 0
    for mid, mail in by_id.items():
        if mid in roots:
            continue  # one of the sent mails itself
        if mid not in of:
            if _has_trailer(mail):
                skipped.append(
                    Skipped(mid, f"not a reply in this thread (replies to {_parent(mail)})")
                )
            continue
        replies += 1
        target = of[mid]
        patches = list(range(1, len(sent.patches) + 1)) if target == 0 else [target]
        found += _trailers(mail, mid, patches, skipped)
    return Harvest(found, skipped, replies)


def _body(mail: EmailMessage) -> str | None:
    part = mail.get_body(preferencelist=("plain",))
    if part is None:
        return None
    return cast(EmailMessage, part).get_content()


def _has_trailer(mail: EmailMessage) -> bool:
    try:
        text = _body(mail) or ""
    except (LookupError, ValueError, KeyError):
        return False
    return any(TRAILER.match(line.lstrip("> ")) for line in text.splitlines())


def _trailers(
    mail: EmailMessage, mid: str, patches: list[int], skipped: list[Skipped]
) -> list[Found]:
    try:
        text = _body(mail)
    except (LookupError, ValueError, KeyError) as e:
        skipped.append(Skipped(mid, f"broken mail: its text cannot be decoded ({e})"))
        return []
    if text is None:
        skipped.append(Skipped(mid, "no text/plain part"))
        return []
    senders = getaddresses([str(mail.get("From", ""))])
    sender = senders[0][1].lower() if senders else ""
    found = []
    in_diff = False
    for line in text.splitlines():
        if line.rstrip() == "--":  # the signature ("-- "), whatever the mailer kept of it
            break
        quoted = QUOTED.match(line)
        candidate = TRAILER.match(line.lstrip("> \t") if quoted else line)
        if DIFF_START.match(line):
            in_diff = True
        if candidate is None:
            continue
        key, value = CANONICAL[candidate[1].lower()], candidate[2]
        if quoted:
            skipped.append(Skipped(mid, f"quoted, not the sender's: '> {key}: {value}'"))
            continue
        if in_diff:
            skipped.append(Skipped(mid, f"inside a diff: '{key}: {value}'"))
            continue
        person = parse_ident(value)
        if person is None:
            skipped.append(Skipped(mid, f"not one 'Name <address>': '{key}: {value}'"))
            continue
        note = (
            f"given by {sender}"
            if sender and person.addr_spec.lower() != sender and key in ("Reviewed-by", "Acked-by")
            else ""
        )
        found += [Found(key, str(person), n, mid, sender, note) for n in patches]
    return found


def read_saved(data: dict) -> Harvest:
    return Harvest(
        [Found(**f) for f in data.get("found", [])],
        [Skipped(**s) for s in data.get("skipped", [])],
        int(data.get("replies", 0)),
    )


# --- what to do with each: new, already there, or on a patch that changed ---------------------


@dataclass(frozen=True)
class Row:
    found: Found
    person: str | None  # the [people] key, None for someone new
    state: str  # NEW, APPLIED, TYPED or CHANGED


NEW, APPLIED, TYPED, CHANGED = "new", "applied", "in series.toml", "patch changed"


def classify(harvest: Harvest, series: Series, sent: Sent, moved: dict[int, str]) -> list[Row]:
    """Each distinct trailer (patch, key, address) once, with what applying it would mean;
    `moved` says which patches changed since `sent` (`kseries.review.sent.changed`)."""
    by_email = {p.email.lower(): p for p in series.people.values()}
    rows, seen = [], set()
    for found in harvest.found:
        address = cast(Address, parse_ident(found.value)).addr_spec.lower()
        if (found.patch, found.key, address) in seen:
            continue
        seen.add((found.patch, found.key, address))
        person = by_email.get(address)
        key = person.key if person else None
        patch = series.patches[found.patch - 1] if found.patch <= len(series.patches) else None
        if any((g.patch, g.key, g.person) == (found.patch, found.key, key) for g in series.given):
            state = APPLIED
        elif patch is not None and person in getattr(patch, KEYS[found.key]):
            state = TYPED
        elif found.patch in moved or patch is None:
            state = CHANGED
        else:
            state = NEW
        rows.append(Row(found, key, state))
    return rows


def apply(edit: Edit, series: Series, sent: Sent, rows: list[Row], changed_too: bool) -> list[Row]:
    """Stage the trailers to apply (NEW, and CHANGED with `changed_too`) and their new people
    into `edit`; return the rows taken."""
    taken = [r for r in rows if r.state == NEW or (changed_too and r.state == CHANGED)]
    keys = set(series.people)
    made: dict[str, str] = {}
    for row in taken:
        person = row.person
        if person is None:
            address = cast(Address, parse_ident(row.found.value))
            person = made.get(address.addr_spec.lower())
            if person is None:
                person = person_key(address.addr_spec, keys)
                keys.add(person)
                made[address.addr_spec.lower()] = person
                edit.add_person(
                    person, address.display_name, address.addr_spec, row.found.message_id
                )
        edit.add_given(
            Given(row.found.patch, row.found.key, person, row.found.message_id, sent.version)
        )
    return taken
