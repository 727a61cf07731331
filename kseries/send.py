"""The series as mails: format-patch, recipients, pre-send checks, and git send-email.

Mails are written to a directory first, with per-mail To:/Cc: headers, so what
`git send-email` sends (or shows with --dry-run) is exactly what is on disk. Nothing is
sent while any check fails. Slow per-patch tools (checkpatch.pl, get_maintainer.pl) are
cached by the patch's content, so a re-run after a change pays only for what changed.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formataddr, getaddresses
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kseries import trailers
from kseries.config import BOOLEAN, INTEGER, STRING, STRING_TABLE, STRINGS, Config, Keys, Kind
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.series import Series

PLACEHOLDERS = ("*** SUBJECT HERE ***", "*** BLURB HERE ***")
CHECKPATCH_TOTAL = re.compile(
    r"total: (?P<errors>\d+) errors, (?P<warnings>\d+) warnings, (?:(?P<checks>\d+) checks, )?"
)
SENT_RE = re.compile(r"^(?:Dry-)?OK\. Log says:$.*?^Subject: (?P<subject>.*?)$", re.M | re.S)


@dataclass
class Mail:
    """One file format-patch wrote, and who it goes to."""

    path: Path
    subject: str
    message_id: str
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Outbox:
    """A series formatted into `directory`: the cover letter first, then each patch."""

    branch: str
    base: str
    directory: Path
    mails: list[Mail]
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


@dataclass
class Delivery:
    """What git send-email did: its output, and which mails went out."""

    dry_run: bool
    output: str
    sent: list[Mail]
    unsent: list[Mail]

    def log(self) -> str:
        """send-email's account of each mail, without its per-address "(mbox) Adding" echo."""
        return "\n".join(
            line for line in self.output.splitlines() if not line.startswith("(mbox) Adding")
        )


SEND = Keys(
    {
        "to": STRINGS,
        "cc": STRINGS,
        "exclude": STRINGS,
        "get_maintainer": BOOLEAN,
        "checkpatch_ignore": STRING_TABLE,  # message type -> why it is ignored
        "smtp": Keys(
            {
                "server": STRING,
                "port": Kind(
                    "a port number or name",
                    lambda v: INTEGER.accepts(v) or isinstance(v, str),
                    "587",
                ),
                "encryption": STRING,
                "user": STRING,
            }
        ),
    }
)


class SendSettings:
    """The [send] table: recipients, checkpatch exceptions, SMTP (never a password)."""

    def __init__(self, config: Config, series: Series) -> None:
        table = config.table("send", SEND)
        self.series = series
        self.where = config.where.table("send")
        self.to = [self._address(v, "to") for v in table.get("to", [])]
        self.cc = [self._address(v, "cc") for v in table.get("cc", [])]
        self.exclude = {a.lower() for _, a in getaddresses(table.get("exclude", []))}
        self.get_maintainer: bool = table.get("get_maintainer", True)
        self.checkpatch_ignore: dict[str, str] = dict(table.get("checkpatch_ignore", {}))
        self.smtp: dict[str, Any] = dict(table.get("smtp", {}))

    def _address(self, value: str, key: str) -> str:
        if value in self.series.people:
            return self.series.people[value].ident
        if "@" not in value:
            raise self.where.error(
                key,
                f"{key}: {value!r} is neither a person key nor an address",
                f"use one of {', '.join(sorted(self.series.people))} or user@example.org",
            )
        return value


def _dedupe(entries: list[str], drop: set[str]) -> list[str]:
    """Keep the first of each address (case-insensitive), in order, without those in drop."""
    seen = set(drop)
    out = []
    for name, address in getaddresses(entries):
        if address and address.lower() not in seen:
            seen.add(address.lower())
            out.append(formataddr((name, address)) if name else address)
    return out


def _cache(tree: WorkTree, kind: str, key: str) -> Path:
    path = tree.git_path(f"kseries/cache/{kind}/{key}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _patch_key(path: Path, *extra: str) -> str:
    """A mail's identity for caching: its diff and message, not its date or Message-ID."""
    text = path.read_text()
    body = text.split("\n\n", 1)[1] if "\n\n" in text else text
    return hashlib.sha256("\0".join((body, *extra)).encode()).hexdigest()


class Postman:
    """Formats, addresses, checks and sends one series from one tree."""

    def __init__(self, tree: WorkTree, series: Series, settings: SendSettings) -> None:
        self.tree = tree
        self.series = series
        self.settings = settings

    def format(self, out: Path) -> Outbox:
        branch = self.series.branch
        if self.tree.rev(f"refs/heads/{branch}") is None:
            raise ToolkitError(f"{self.tree.path}: no branch {branch}", "run `invoke rebase` first")
        base = self.tree.git("merge-base", branch, self.series.base.tracking_ref).strip()
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        files = self.tree.git(
            "format-patch",
            f"-v{self.series.version}",
            "--cover-letter",
            "--cover-from-description=subject",
            f"--base={base}",
            "--thread=shallow",
            "--no-signature",
            "--zero-commit",
            "-o",
            str(out),
            f"{base}..{branch}",
            env=self.series.committer_env,  # Message-IDs in the submitter's domain
        ).split()
        mails = []
        for name in files:
            path = Path(name) if Path(name).is_absolute() else self.tree.path / name
            headers = email.message_from_string(path.read_text(), policy=email.policy.default)
            subject = " ".join(str(headers["Subject"]).split())
            mails.append(Mail(path, subject, str(headers["Message-ID"]).strip("<>")))
        outbox = Outbox(branch, base, out, mails)
        self._address(outbox)
        return outbox

    # -- recipients ------------------------------------------------------------------------

    def _address(self, outbox: Outbox) -> None:
        """Per-patch To/Cc (trailer people, get_maintainer.pl, config); the cover gets all."""
        me = self.series.submitter.email.lower()
        to = _dedupe(self.settings.to, self.settings.exclude)
        drop = {a.lower() for _, a in getaddresses(to)} | self.settings.exclude | {me}
        patches = outbox.mails[1:]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            found = list(pool.map(self._maintainers, patches))
        every: list[str] = []
        for mail, maintainers in zip(patches, found, strict=True):
            people = [
                t.value for t in self._trailers(mail.path)[1] if t.key in trailers.IDENTITY_KEYS
            ]
            mail.to = to
            mail.cc = _dedupe([*people, *maintainers, *self.settings.cc], drop)
            every += mail.cc
        outbox.mails[0].to = to
        outbox.mails[0].cc = _dedupe(every, drop)
        for mail in outbox.mails:
            _write_recipients(mail)

    def _maintainers(self, mail: Mail) -> list[str]:
        if not self.settings.get_maintainer:
            return []
        cache = _cache(self.tree, "get_maintainer", _patch_key(mail.path))
        if cache.exists():
            return json.loads(cache.read_text())
        result = subprocess.run(
            [
                "perl",
                "scripts/get_maintainer.pl",
                "--nogit",
                "--nogit-fallback",
                "--norolestats",
                "--nomultiline",
                "--separator",
                "\n",
                str(mail.path),
            ],
            cwd=self.tree.path,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ToolkitError(
                f"{self.tree.path}: get_maintainer.pl failed on {mail.path.name}: "
                f"{result.stderr.strip().splitlines()[-1:]}",
                "set [send] get_maintainer = false to address the series by config only",
            )
        found = [line.strip() for line in result.stdout.splitlines() if "@" in line]
        cache.write_text(json.dumps(found))
        return found

    @staticmethod
    def _trailers(path: Path) -> tuple[str, list[trailers.Trailer]]:
        """(From author, trailers) of a patch mail, as git mailinfo and interpret-trailers see."""
        mail = email.message_from_string(path.read_text(), policy=email.policy.default)
        body = mail.get_content().split("\n---\n", 1)[0]
        return str(mail["From"]), trailers.parse(body)

    # -- checks ----------------------------------------------------------------------------

    def check(self, outbox: Outbox, *, sending: bool) -> list[Check]:
        """Every pre-send check; the outbox keeps the results."""
        patches = outbox.mails[1:]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            checkpatch = list(pool.map(self._checkpatch, patches))
        outbox.checks = [
            self._sender(sending),
            self._numbering(outbox),
            self._placeholders(outbox),
            self._trailer_rules(patches),
            self._applies(outbox),
            Check(
                "checkpatch --strict",
                all(ok for ok, _ in checkpatch),
                "; ".join(d for _, d in checkpatch if d),
            ),
        ]
        return outbox.checks

    def _sender(self, sending: bool) -> Check:
        """The From: is the configured submitter; a real send also needs an SMTP server."""
        who = self.series.submitter.ident
        if not sending:
            return Check("sender identity", True, who)
        server = (
            self.settings.smtp.get("server")
            or self.tree.try_git("config", "sendemail.smtpServer")[1].strip()
        )
        return Check(
            "sender identity",
            bool(server),
            f"{who} via {server}"
            if server
            else f"{who}: no SMTP server ([send.smtp] server or git config sendemail.smtpServer)",
        )

    def _numbering(self, outbox: Outbox) -> Check:
        total = len(outbox.mails) - 1
        prefix = self.series.subject_prefix
        wrong = [
            m.subject
            for n, m in enumerate(outbox.mails)
            if not m.subject.startswith(f"[{prefix} {n}/{total}] ")
        ]
        return Check(f"subjects numbered [{prefix} n/{total}]", not wrong, "; ".join(wrong))

    @staticmethod
    def _placeholders(outbox: Outbox) -> Check:
        left = [
            f"{m.path.name}: {p}"
            for m in outbox.mails
            for p in PLACEHOLDERS
            if p in m.path.read_text()
        ]
        return Check(
            "no template placeholders",
            not left,
            "; ".join(left) + (" (run `invoke rebase` to set the cover letter)" if left else ""),
        )

    def _trailer_rules(self, patches: list[Mail]) -> Check:
        for mail in patches:
            author, block = self._trailers(mail.path)
            try:
                trailers.check(
                    block,
                    author=author,
                    submitter=self.series.submitter.ident,
                    where=mail.path.name,
                )
            except trailers.TrailerRuleError as e:
                return Check("trailer rules", False, e.message)
        return Check("trailer rules", True)

    def _applies(self, outbox: Outbox) -> Check:
        """Apply the mails in order onto the base in a scratch index: the work tree is untouched.

        The index holds only the paths the series touches, taken from the base; reading the
        whole kernel tree into an index would cost more than every other check together.
        """
        name = f"applies to base {outbox.base[:12]}"
        paths = sorted({p for m in outbox.mails[1:] for p in _touched(m.path)})
        with tempfile.TemporaryDirectory(prefix="kseries-index-") as scratch:
            env = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
            entries = self.tree.git("ls-tree", "-r", "-z", outbox.base, "--", *paths)
            self.tree.git("update-index", "-z", "--index-info", env=env, stdin=entries)
            for mail in outbox.mails[1:]:
                status, _, err = self.tree.try_git("apply", "--cached", str(mail.path), env=env)
                if status != 0:
                    return Check(name, False, f"{mail.path.name}: {err.strip().splitlines()[0]}")
        return Check(name, True)

    def _checkpatch(self, mail: Mail) -> tuple[bool, str]:
        ignore = sorted(self.settings.checkpatch_ignore)
        cache = _cache(self.tree, "checkpatch", _patch_key(mail.path, *ignore))
        if cache.exists():
            ok, detail = json.loads(cache.read_text())
            return ok, detail
        command = [
            "perl",
            "scripts/checkpatch.pl",
            "--strict",
            "--no-summary-file",
            "--color=never",
        ]
        if ignore:
            command += ["--ignore", ",".join(ignore)]
        # /usr/bin first: checkpatch's SPDX check runs `python3` and needs Debian's ply and git
        # modules, which a venv's or pyenv's python3 lacks.
        env = {**os.environ, "PATH": f"/usr/bin:{os.environ.get('PATH', '')}"}
        result = subprocess.run(
            [*command, str(mail.path)],
            env=env,
            cwd=self.tree.path,
            capture_output=True,
            text=True,
            check=False,
        )
        totals = CHECKPATCH_TOTAL.search(result.stdout)
        if totals is None:
            raise ToolkitError(
                f"{self.tree.path}: checkpatch.pl gave no totals for {mail.path.name}",
                f"run it by hand: {' '.join(command)} {mail.path}",
            )
        problems = [
            line
            for line in result.stdout.splitlines()
            if line.startswith(("ERROR:", "WARNING:", "CHECK:"))
        ]
        ok = not any(int(totals[k] or 0) for k in ("errors", "warnings", "checks"))
        detail = "" if ok else f"{mail.path.name}: " + " | ".join(problems[:3])
        cache.write_text(json.dumps([ok, detail]))
        return ok, detail

    def rehearse(self, outbox: Outbox) -> Delivery:
        """The dry run: every check, and `git send-email --dry-run` beside them (both only read
        the mail files, and the dry run is most of the wait)."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            dry_run = pool.submit(self.send, outbox, dry_run=True)
            self.check(outbox, sending=False)
            return dry_run.result()

    # -- sending ---------------------------------------------------------------------------

    def send(self, outbox: Outbox, *, dry_run: bool) -> Delivery:
        """git send-email over the files as they are on disk; dry run unless told otherwise."""
        if outbox.failed and not dry_run:
            raise ToolkitError(
                f"not sending: {len(outbox.failed)} pre-send checks failed "
                f"({', '.join(c.name for c in outbox.failed)})",
                "fix them and run invoke send-series again",
            )
        # The recipients are the To:/Cc: headers written into each file; git's guesses stay off.
        command = [
            "send-email",
            "--confirm=never",
            *(f"--suppress-cc={what}" for what in ("author", "self", "body", "cccmd")),
            "--no-chain-reply-to",
            "--8bit-encoding=UTF-8",
            "--transfer-encoding=8bit",
            f"--from={self.series.submitter.ident}",
            *self._smtp_options(),
        ]
        if dry_run:
            command.append("--dry-run")
        command += [str(m.path) for m in outbox.mails]
        status, out, err = self.tree.try_git(*command)
        went = {" ".join(m["subject"].split()) for m in SENT_RE.finditer(out)}
        sent = [m for m in outbox.mails if m.subject in went]
        unsent = [m for m in outbox.mails if m.subject not in went]
        delivery = Delivery(dry_run, out, sent, unsent)
        if status != 0:
            raise PartialSend(delivery, err.strip(), command[: -len(outbox.mails)])
        return delivery

    def _smtp_options(self) -> list[str]:
        """SMTP settings from [send.smtp]; git config's sendemail.* applies when absent."""
        names = {
            "server": "--smtp-server",
            "port": "--smtp-server-port",
            "encryption": "--smtp-encryption",
            "user": "--smtp-user",
        }
        return [
            f"{flag}={self.settings.smtp[key]}"
            for key, flag in names.items()
            if self.settings.smtp.get(key) not in (None, "")
        ]


class PartialSend(ToolkitError):
    """send-email stopped part-way: say exactly what went out and how to send the rest."""

    def __init__(self, delivery: Delivery, error: str, command: list[str]) -> None:
        went = ", ".join(m.path.name for m in delivery.sent) or "none"
        rest = " ".join(str(m.path) for m in delivery.unsent)
        reason = error.splitlines()[-1] if error else "git send-email failed"
        super().__init__(
            f"git send-email stopped: {reason}; sent: {went}; not sent: "
            f"{', '.join(m.path.name for m in delivery.unsent)}",
            "the files keep their In-Reply-To headers, so the thread stays intact: "
            f"git {' '.join(command)} {rest}",
        )
        self.delivery = delivery


def _touched(path: Path) -> list[str]:
    """The paths a patch mail reads or writes, from its `diff --git a/X b/Y` lines."""
    return [
        side[2:]
        for line in path.read_text().splitlines()
        if line.startswith("diff --git a/")
        for side in line[len("diff --git ") :].split(" ")
    ]


def _write_recipients(mail: Mail) -> None:
    """Put To:/Cc: headers into the file, right after Subject:, replacing any there."""
    head, sep, rest = mail.path.read_text().partition("\n\n")
    lines = [line for line in head.split("\n") if not line.startswith(("To:", "Cc:"))]
    at = next(i for i, line in enumerate(lines) if line.startswith("Subject:")) + 1
    while at < len(lines) and lines[at][:1] in (" ", "\t"):
        at += 1
    extra = [
        f"{key}: {', '.join(values)}"
        for key, values in (("To", mail.to), ("Cc", mail.cc))
        if values
    ]
    mail.path.write_text("\n".join(lines[:at] + extra + lines[at:]) + sep + rest)


def report(outbox: Outbox) -> Group:
    """The summary a sender reads before anything leaves: each mail, then each check."""
    total = len(outbox.mails) - 1
    mails = Table(title=f"{outbox.branch} -> {outbox.directory}", title_justify="left")
    for column in ("#", "subject", "to", "cc", "bytes"):
        mails.add_column(column, no_wrap=column != "subject")
    for n, mail in enumerate(outbox.mails):
        mails.add_row(
            f"{n}/{total}", mail.subject, str(len(mail.to)), str(len(mail.cc)), str(mail.size)
        )
    recipients = Text()
    for n, mail in enumerate(outbox.mails):
        recipients.append(f"{n}/{total} To: {', '.join(mail.to)}\n")
        recipients.append(f"{' ' * len(str(n) + str(total))}  Cc: {', '.join(mail.cc)}\n")
    checks = Table(title="pre-send checks", title_justify="left", show_header=False)
    for check in outbox.checks:
        mark = "[green]ok[/green]" if check.ok else "[red]FAIL[/red]"
        checks.add_row(mark, check.name, escape(check.detail))
    return Group(mails, recipients, checks)
