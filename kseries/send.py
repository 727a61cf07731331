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
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from functools import cached_property
from pathlib import Path
from typing import Any, cast

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kseries import evidence, records, style, trailers
from kseries.config import BOOLEAN, INTEGER, STRING, STRING_TABLE, STRINGS, Config, Keys, Kind
from kseries.core.files import output_dir, write_atomic
from kseries.core.run import run
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.review import sent as sent_stage
from kseries.series import Series, parse_addresses

PLACEHOLDERS = ("*** SUBJECT HERE ***", "*** BLURB HERE ***")
CHECKPATCH_TOTAL = re.compile(
    r"total: (?P<errors>\d+) errors, (?P<warnings>\d+) warnings, (?:(?P<checks>\d+) checks, )?"
)
# In an --out directory: which series' run wrote it, and the files it wrote there.
STAMP = ".kseries-send.json"
# Headers we write: 78 columns, non-ASCII as RFC 2047 encoded words (no SMTPUTF8 needed).
POLICY = email.policy.default
SENT_RE = re.compile(r"^(?:Dry-)?OK\. Log says:$.*?^Subject: (?P<subject>.*?)$", re.M | re.S)
# checkpatch.pl --show-types: what it says of a commit id the tree cannot look up.
UNKNOWN_COMMIT_ID = "WARNING:UNKNOWN_COMMIT_ID:"


@dataclass
class Mail:
    """One file format-patch wrote, read once: every check shares its parsed parts (headers,
    changelog, trailers, touched paths); and who it goes to."""

    path: Path
    raw: bytes  # the file as it is (with To:/Cc: once addressed)
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Mail:
        return cls(path, path.read_bytes())

    @cached_property
    def message(self) -> EmailMessage:
        """Parsed from bytes, so the 8-bit UTF-8 body decodes by its charset, not as ASCII."""
        return cast(EmailMessage, email.message_from_bytes(self.raw, policy=POLICY))

    @property
    def text(self) -> str:
        return self.raw.decode(errors="replace")

    @property
    def size(self) -> int:
        return len(self.raw)

    @cached_property
    def subject(self) -> str:
        return " ".join(str(self.message["Subject"]).split())

    @cached_property
    def message_id(self) -> str:
        return str(self.message["Message-ID"]).strip("<>")

    @property
    def shortlog(self) -> str:
        """The subject without its [PATCH v2 n/N] tags: what git log shows."""
        return self.subject.split("] ", 1)[-1]

    @cached_property
    def author(self) -> str:
        """From:, decoded from RFC 2047, as git mailinfo sees it."""
        return str(self.message["From"])

    @cached_property
    def changelog(self) -> str:
        """The commit message body, trailers included: what comes before its ---."""
        return self.message.get_content().split("\n---\n", 1)[0]

    @property
    def prose(self) -> str:
        """The changelog without the trailer block, its last paragraph."""
        return "\n\n".join(self.changelog.strip().split("\n\n")[:-1])

    @cached_property
    def trailer_block(self) -> list[trailers.Trailer]:
        """The trailers git interpret-trailers sees in the changelog (one run per mail)."""
        return trailers.parse(self.changelog)

    @cached_property
    def touched(self) -> list[str]:
        """The paths the patch reads or writes, from its `diff --git a/X b/Y` lines."""
        return [
            side[2:]
            for line in self.text.splitlines()
            if line.startswith("diff --git a/")
            for side in line[len("diff --git ") :].split(" ")
        ]

    def key(self, *extra: str) -> str:
        """The mail's identity for caching: its diff and message, not its date, Message-ID
        or recipients."""
        text = self.text
        body = text.split("\n\n", 1)[1] if "\n\n" in text else text
        return hashlib.sha256("\0".join((body, *extra)).encode()).hexdigest()

    def address(self, to: list[str], cc: list[str]) -> None:
        """Put To:/Cc: headers into the file, right after Subject:, replacing any there.

        The email package writes them: names quoted where RFC 5322 needs it, non-ASCII ones
        as RFC 2047 encoded words, long lists folded; the rest of the file is left byte for
        byte. Nothing parsed before depends on the recipients."""
        self.to, self.cc = to, cc
        head, sep, rest = self.text.partition("\n\n")
        fields: list[str] = []  # one header each, with its continuation lines
        for line in head.split("\n"):
            if line[:1] in (" ", "\t") and fields:
                fields[-1] += "\n" + line
            else:
                fields.append(line)
        fields = [f for f in fields if not f.lower().startswith(("to:", "cc:"))]
        at = next(i for i, f in enumerate(fields) if f.lower().startswith("subject:")) + 1
        extra = [
            POLICY.header_factory(key, ", ".join(values)).fold(policy=POLICY).rstrip("\n")
            for key, values in (("To", to), ("Cc", cc))
            if values
        ]
        self.raw = ("\n".join(fields[:at] + extra + fields[at:]) + sep + rest).encode()
        self.__dict__.pop("message", None)
        write_atomic(self.path, self.raw)


@dataclass
class MailCheck:
    name: str
    ok: bool
    detail: str = ""
    warn: bool = False  # passed, with something the sender should read first


@dataclass
class Outbox:
    """A series formatted into `directory`: the cover letter first, then each patch."""

    branch: str
    base: str
    directory: Path
    mails: list[Mail]
    checks: list[MailCheck] = field(default_factory=list)
    testing: evidence.Testing | None = None  # the cover letter's Testing section, if it has one

    @property
    def failed(self) -> list[MailCheck]:
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
        # checkpatch.pl's options: the kernel's --strict by default; QEMU's --strict means
        # "fail on warnings too", which the check does anyway
        "checkpatch_options": STRINGS,
        # whether the tree's checkpatch.pl has --show-types and --ignore (QEMU's has neither)
        "checkpatch_types": BOOLEAN,
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
        self.to = [str(self._address(v, "to")) for v in table.get("to", [])]
        self.cc = [str(self._address(v, "cc")) for v in table.get("cc", [])]
        self.exclude = {
            self._address(v, "exclude").addr_spec.lower() for v in table.get("exclude", [])
        }
        self.get_maintainer: bool = table.get("get_maintainer", True)
        self.checkpatch_ignore: dict[str, str] = dict(table.get("checkpatch_ignore", {}))
        self.checkpatch_options: list[str] = list(table.get("checkpatch_options", ["--strict"]))
        self.checkpatch_types: bool = table.get("checkpatch_types", True)
        if self.checkpatch_ignore and not self.checkpatch_types:
            raise self.where.error(
                "checkpatch_ignore",
                "checkpatch_ignore needs a checkpatch.pl with --ignore (checkpatch_types = true)",
                "remove checkpatch_ignore, or set checkpatch_types = true",
            )
        self.smtp: dict[str, Any] = dict(table.get("smtp", {}))

    def _address(self, value: str, key: str) -> Address:
        """A person key, or exactly one address: `Bonzini, Paolo <...>` unquoted is two."""
        if value in self.series.people:
            person = self.series.people[value]
            return Address(display_name=person.name, addr_spec=person.email)
        found = parse_addresses(value) if "@" in value else None
        if found is None or len(found) != 1:
            raise self.where.error(
                key,
                f"{key}: {value!r} is neither a person key nor one address",
                f"use one of {', '.join(sorted(self.series.people))} or user@example.org; "
                'a name with a comma goes in double quotes: "Last, First" <user@example.org>',
            )
        return found[0]


def _dedupe(entries: list[str], drop: set[str], where: str) -> list[str]:
    """Keep the first of each address (case-insensitive), in order, without those in drop.

    Each comes out as one well-formed "Name <email>", the name quoted if it needs it, so a
    comma in a name never splits one person into two recipients."""
    seen = set(drop)
    out = []
    for entry in entries:
        found = parse_addresses(entry)
        if found is None:
            raise ToolkitError(
                f"{where}: recipient {entry!r} is not a well-formed address",
                "fix it where it comes from: the trailer, [send] or MAINTAINERS",
            )
        for address in found:
            if address.addr_spec.lower() not in seen:
                seen.add(address.addr_spec.lower())
                out.append(str(address))
    return out


def _cache(tree: WorkTree, kind: str, key: str) -> Path:
    path = tree.git_path(f"kseries/cache/{kind}/{key}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class Postman:
    """Formats, addresses, checks and sends one series from one tree."""

    def __init__(
        self, tree: WorkTree, series: Series, settings: SendSettings, *, testing: bool = True
    ) -> None:
        self.tree = tree
        self.series = series
        self.settings = settings
        self.testing = testing  # False: no Testing section, and no test report needed

    def format(self, out: Path) -> Outbox:
        """Write the mails into `out`; refuse a branch a stopped rebase has not finished."""
        branch = self.series.branch
        if records.rebase_state(self.tree).exists():
            raise ToolkitError(
                f"{self.tree.path}: a kseries rebase is stopped on a conflict, "
                f"so {branch} is not finished",
                "resolve it and run `invoke rebase --continue`, or undo the run with "
                "`invoke rebase --abort`",
            )
        if self.tree.rev(f"refs/heads/{branch}") is None:
            raise ToolkitError(f"{self.tree.path}: no branch {branch}", "run `invoke rebase` first")
        base = records.series_base(self.tree, branch, self.series.base.tracking_ref)
        testing = evidence.prepare(self.tree, self.series) if self.testing else None
        out = _claim(out, self.series)
        # v1 goes out unnumbered, [PATCH n/N], as the kernel's first postings do
        reroll = [f"-v{self.series.version}"] if self.series.version > 1 else []
        files = self.tree.git(
            "format-patch",
            *reroll,
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
        ).splitlines()
        _stamp(out, self.series, [Path(name).name for name in files])
        paths = [Path(n) if Path(n).is_absolute() else self.tree.path / n for n in files]
        if testing:
            testing.splice(paths[0])
        sent_stage.stamp_change_id(paths[0], self.series.change_id)
        outbox = Outbox(branch, base, out, [Mail.read(path) for path in paths], testing=testing)
        self._address(outbox)
        return outbox

    # -- recipients ------------------------------------------------------------------------

    def _address(self, outbox: Outbox) -> None:
        """Per-patch To/Cc (trailer people, get_maintainer.pl, config); the cover gets all."""
        me = self.series.submitter.email.lower()
        to = _dedupe(self.settings.to, self.settings.exclude, "[send] to")
        addressed = {a.addr_spec.lower() for entry in to for a in parse_addresses(entry) or ()}
        drop = addressed | self.settings.exclude | {me}
        patches = outbox.mails[1:]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            found = list(pool.map(self._maintainers, patches))
        every: list[str] = []
        for mail, maintainers in zip(patches, found, strict=True):
            people = [t.value for t in mail.trailer_block if t.key in trailers.IDENTITY_KEYS]
            cc = _dedupe([*people, *maintainers, *self.settings.cc], drop, mail.path.name)
            mail.address(to, cc)
            every += cc
        cover = outbox.mails[0]
        cover.address(to, _dedupe(every, drop, cover.path.name))

    def _maintainers(self, mail: Mail) -> list[str]:
        if not self.settings.get_maintainer:
            return []
        cache = _cache(self.tree, "get_maintainer", mail.key())
        if cache.exists():
            return json.loads(cache.read_text())
        result = run(
            [
                "perl",
                "scripts/get_maintainer.pl",
                "--nogit",
                "--nogit-fallback",
                "--norolestats",
                "--nomultiline",
                "--separator",
                "\n",
                mail.path,
            ],
            cwd=self.tree.path,
            check=False,
        )
        if not result.ok:
            raise ToolkitError(
                f"{self.tree.path}: get_maintainer.pl failed on {mail.path.name}: "
                f"{result.stderr.strip().splitlines()[-1:]}",
                "set [send] get_maintainer = false to address the series by config only",
            )
        found = [line.strip() for line in result.stdout.splitlines() if "@" in line]
        write_atomic(cache, json.dumps(found))
        return found

    # -- checks ----------------------------------------------------------------------------

    def check(self, outbox: Outbox, *, sending: bool) -> list[MailCheck]:
        """Every pre-send check; the outbox keeps the results."""
        patches = outbox.mails[1:]
        # No history before the base (the embedded default tree is one imported commit):
        # checkpatch cannot look up a Fixes: id there, which is no fault of the patch.
        history = self.tree.try_git("rev-parse", "--verify", "--quiet", f"{outbox.base}^")[0] == 0
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            checkpatch = list(pool.map(lambda mail: self._checkpatch(mail, history), patches))
        outbox.checks = [
            self._sender(sending),
            self._numbering(outbox),
            self._subject_lengths(outbox),
            self._placeholders(outbox),
            self._changelog_rules(outbox),
            self._trailer_rules(patches),
            self._applies(outbox),
            self._evidence(outbox),
            MailCheck(
                " ".join(["checkpatch", *self.settings.checkpatch_options]),
                all(c.ok for c in checkpatch),
                "; ".join(c.detail for c in checkpatch if c.detail),
                warn=any(c.warn for c in checkpatch),
            ),
            *self._review_checks(outbox, sending),
        ]
        return outbox.checks

    def _evidence(self, outbox: Outbox) -> MailCheck:
        """The test report the Testing section came from: a failed series run or check gate
        fails (it would be mailed as evidence); what the report lacks only warns."""
        if outbox.testing is None:
            return MailCheck("test evidence", True, "no Testing section (--untested)", warn=True)
        return MailCheck("test evidence", *outbox.testing.evidence.verdict())

    def _review_checks(self, outbox: Outbox, sending: bool) -> list[MailCheck]:
        """The review loop's: a version goes out once, and from v2 on the cover letter names
        every patch changed since the version before (kseries.review.sent)."""
        verdicts = [
            sent_stage.not_sent_before(self.tree, self.series, sending=sending),
            sent_stage.changes_named(
                self.tree, self.series, outbox.base, outbox.mails[0].message.get_content()
            ),
        ]
        return [MailCheck(*v) for v in verdicts if v is not None]

    def _sender(self, sending: bool) -> MailCheck:
        """The From: is the configured submitter; a real send also needs an SMTP server."""
        who = self.series.submitter.ident
        if not sending:
            return MailCheck("sender identity", True, who)
        server = (
            self.settings.smtp.get("server")
            or self.tree.try_git("config", "sendemail.smtpServer")[1].strip()
        )
        return MailCheck(
            "sender identity",
            bool(server),
            f"{who} via {server}"
            if server
            else f"{who}: no SMTP server ([send.smtp] server or git config sendemail.smtpServer)",
        )

    def _numbering(self, outbox: Outbox) -> MailCheck:
        total = len(outbox.mails) - 1
        prefix = self.series.subject_prefix
        wrong = [
            m.subject
            for n, m in enumerate(outbox.mails)
            if not m.subject.startswith(f"[{prefix} {n}/{total}] ")
        ]
        return MailCheck(f"subjects numbered [{prefix} n/{total}]", not wrong, "; ".join(wrong))

    @staticmethod
    def _subject_lengths(outbox: Outbox) -> MailCheck:
        """Over the firm limit only warns (maintainer-kvm-x86.rst lets a shortlog "run a few
        characters over"); over the hard one the changelog rules fail."""
        limit = style.SUBJECT_LIMIT
        long = [
            f"{m.path.name}: {len(m.shortlog)} characters"
            for m in outbox.mails
            if len(m.shortlog) > limit
        ]
        return MailCheck(
            f"subjects at most {limit} characters", True, "; ".join(long), warn=bool(long)
        )

    @staticmethod
    def _placeholders(outbox: Outbox) -> MailCheck:
        left = [f"{m.path.name}: {p}" for m in outbox.mails for p in PLACEHOLDERS if p in m.text]
        return MailCheck(
            "no template placeholders",
            not left,
            "; ".join(left) + (" (run `invoke rebase` to set the cover letter)" if left else ""),
        )

    def _changelog_rules(self, outbox: Outbox) -> MailCheck:
        """The changelog rules on the mails as they will be read (a commit amended by hand
        included): the cover letter's subject, and each patch's subject and body."""
        prefixes = self.series.shortlog_prefixes
        cover, patches = outbox.mails[0], outbox.mails[1:]
        templates = [self.series.templates_dir / p.template for p in self.series.patches]
        try:
            style.check_subject(cover.shortlog, prefixes=prefixes, where=cover.path.name)
            for n, mail in enumerate(patches):
                template = f" ({templates[n]})" if n < len(templates) else ""
                style.check_commit(
                    mail.shortlog,
                    mail.prose,
                    prefixes=prefixes,
                    where=f"{mail.path.name}{template}",
                )
        except style.ChangelogRuleError as e:
            return MailCheck("changelog rules", False, e.message)
        return MailCheck("changelog rules", True)

    def _trailer_rules(self, patches: list[Mail]) -> MailCheck:
        for mail in patches:
            try:
                trailers.check(
                    mail.trailer_block,
                    author=mail.author,
                    submitter=self.series.submitter.ident,
                    where=mail.path.name,
                )
            except trailers.TrailerRuleError as e:
                return MailCheck("trailer rules", False, e.message)
        return MailCheck("trailer rules", True)

    def _applies(self, outbox: Outbox) -> MailCheck:
        """Apply the mails in order onto the base in a scratch index: the work tree is untouched.

        The index holds only the paths the series touches, taken from the base; reading the
        whole kernel tree into an index would cost more than every other check together.
        """
        name = f"applies to base {outbox.base[:12]}"
        paths = sorted({p for m in outbox.mails[1:] for p in m.touched})
        with tempfile.TemporaryDirectory(prefix="kseries-index-") as scratch:
            env = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
            entries = self.tree.git("ls-tree", "-r", "-z", outbox.base, "--", *paths)
            self.tree.git("update-index", "-z", "--index-info", env=env, stdin=entries)
            for mail in outbox.mails[1:]:
                status, _, err = self.tree.try_git("apply", "--cached", str(mail.path), env=env)
                if status != 0:
                    return MailCheck(
                        name, False, f"{mail.path.name}: {err.strip().splitlines()[0]}"
                    )
        return MailCheck(name, True)

    def _checkpatch(self, mail: Mail, history: bool) -> MailCheck:
        """checkpatch (--strict: [send] checkpatch_options) on one mail. Without `history`
        (see `check`), an unknown commit id is reported as not verified, a warning, rather
        than failing the mail."""
        ignore = sorted(self.settings.checkpatch_ignore)
        options = self.settings.checkpatch_options
        types = ["--show-types"] if self.settings.checkpatch_types else []
        cache = _cache(self.tree, "checkpatch", mail.key(*ignore, f"{history=}", *options, *types))
        if cache.exists():
            ok, detail, warn = json.loads(cache.read_text())
            return MailCheck(mail.path.name, ok, detail, warn)
        command = [
            "perl",
            "scripts/checkpatch.pl",
            *options,
            *types,
            "--no-summary-file",
            "--color=never",
        ]
        if ignore:
            command += ["--ignore", ",".join(ignore)]
        # /usr/bin first: checkpatch's SPDX check runs `python3` and needs Debian's ply and git
        # modules, which a venv's or pyenv's python3 lacks.
        env = {**os.environ, "PATH": f"/usr/bin:{os.environ.get('PATH', '')}"}
        result = run([*command, mail.path], env=env, cwd=self.tree.path, check=False)
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
        counted = sum(int(totals[k] or 0) for k in ("errors", "warnings", "checks"))
        unverified = [] if history else [p for p in problems if p.startswith(UNKNOWN_COMMIT_ID)]
        ok, warn = counted == len(unverified), bool(unverified)
        if not ok:
            detail = f"{mail.path.name}: " + " | ".join(problems[:3])
        elif warn:
            detail = (
                f"{mail.path.name}: commit ids not verified, the tree has no history before "
                "the base: " + " | ".join(unverified)
            )
        else:
            detail = ""
        write_atomic(cache, json.dumps([ok, detail, warn]))
        return MailCheck(mail.path.name, ok, detail, warn)

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


def _claim(out: Path, series: Series) -> Path:
    """Make `out` ready for this series' mails, deleting only the files an earlier run of this
    series wrote there (its stamp lists them); return it absolute.

    Refused: a file; the project's own patches/, templates/ or configs/, or anything in them;
    a non-empty directory that no run of this series wrote. The check comes first, so a
    refusal leaves everything as it was.
    """
    out = out.expanduser().resolve()  # from where the user stands, not from the kernel tree
    for kind, data in (
        ("patches", series.patches_dir),
        ("templates", series.templates_dir),
        ("configs", series.source.parent),
    ):
        data = data.resolve()
        if out == data or data in out.parents:
            raise ToolkitError(
                f"--out {out} is inside the series' {kind} directory {data}",
                "write the mails anywhere else (the default is out/<branch>/ in the project)",
            )
    output_dir(out)  # made if missing; a file, or one that cannot be written, is refused
    earlier = _stamped(out, series) if any(out.iterdir()) else []
    for path in (out / name for name in earlier):
        if path.is_file() or path.is_symlink():
            path.unlink()
    _stamp(out, series, [])  # claimed now, so an interrupted run is still known as ours
    return out


def _stamp(out: Path, series: Series, files: list[str]) -> None:
    """Record in `out` which series wrote it and which files, for the next run to clear."""
    write_atomic(out / STAMP, json.dumps({"series": series.name, "files": files}, indent=2) + "\n")


def _stamped(out: Path, series: Series) -> list[str]:
    """The files an earlier run of this series wrote in `out`; refuse a directory it did not."""
    path = out / STAMP
    keep = "name an empty or new directory; nothing in this one was touched"
    if not path.is_file():
        raise ToolkitError(f"--out {out} is not empty and holds no send-series output", keep)
    try:
        stamp = json.loads(path.read_text())
        owner, files = stamp["series"], stamp["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ToolkitError(f"{path}: damaged, so it is unknown what may go ({e})", keep) from e
    if owner != series.name:
        raise ToolkitError(f"--out {out} holds the mails of another series, {owner!r}", keep)
    if not isinstance(files, list) or not all(
        isinstance(f, str) and f not in ("", ".", "..", STAMP) and Path(f).name == f for f in files
    ):
        raise ToolkitError(f"{path}: damaged, its files are not plain file names", keep)
    return files


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
        mark = (
            "[red]FAIL[/red]"
            if not check.ok
            else "[yellow]warn[/yellow]"
            if check.warn
            else "[green]ok[/green]"
        )
        checks.add_row(mark, check.name, escape(check.detail))
    return Group(mails, recipients, checks)
