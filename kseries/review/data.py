"""The review loop's facts in configs/: what was sent, and the trailers taken from replies.

configs/review.toml holds `[[sent]]` (one per sent version, written by `send-series --send`)
and `[[trailer]]` (one per trailer `trailers --apply` took from a reply, with the Message-ID
it came from). They are data, committed with the series, read like every other table (each
key checked). Edits go through tomlkit, so the files keep their comments and layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kseries.config import DATE, INTEGER, NUMBER, STRING, STRINGS, Config, Keys, Kind, Rows
from kseries.core.files import exclusive, write_atomic
from kseries.errors import ToolkitError

FILE = "review.toml"
# (trailer key, the [[patch]] field it fills), as a reply writes the key.
KEYS = {
    "Reviewed-by": "reviewed_by",
    "Acked-by": "acked_by",
    "Tested-by": "tested_by",
    "Reported-by": "reported_by",
    "Suggested-by": "suggested_by",
}
VERSION = Kind("a positive integer", lambda v: INTEGER.accepts(v) and v >= 1, "2")
SENT = Rows(
    Keys(
        {
            "version": VERSION,
            "branch": STRING,
            "date": DATE,
            "base": STRING,
            "tip": STRING,
            "tag": STRING,
            "change_id": STRING,
            "cover": STRING,  # the cover letter's Message-ID, without <>
            "link": STRING,
            "to": STRINGS,
            "cc": STRINGS,
            # per patch, in order: Message-ID, subject, `git patch-id --stable` of the diff,
            # sha256 of the message without its trailers (what "changed since" compares)
            "patches": STRINGS,
            "subjects": STRINGS,
            "patch_ids": STRINGS,
            "prose": STRINGS,
        }
    )
)
TRAILER = Rows(
    Keys(
        {
            "patch": Kind("a patch number", lambda v: INTEGER.accepts(v) and v >= 1, "1"),
            "key": Kind("one of " + ", ".join(KEYS), lambda v: v in KEYS, '"Reviewed-by"'),
            "person": STRING,
            "message_id": STRING,
            "version": VERSION,
        }
    )
)
REVIEW = Keys(
    {
        "archive": STRING,  # the public-inbox the replies are read from, and links point to
        "timeout": Kind("a positive number", lambda v: NUMBER.accepts(v) and v > 0, "30"),
    }
)
DEFAULT_ARCHIVE = "https://lore.kernel.org/all"


@dataclass(frozen=True)
class SentPatch:
    message_id: str
    subject: str
    patch_id: str
    prose: str


@dataclass(frozen=True)
class Sent:
    """One sent version: where it went, on what, and each patch's identity and fingerprint."""

    version: int
    branch: str
    date: str
    base: str
    tip: str
    tag: str
    change_id: str
    cover: str
    link: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    patches: tuple[SentPatch, ...]

    def to_toml(self) -> dict[str, Any]:
        plain = {k: v for k, v in vars(self).items() if k != "patches"}
        plain |= {k: list(v) for k, v in plain.items() if isinstance(v, tuple)}
        for name, field in (
            ("patches", "message_id"),
            ("subjects", "subject"),
            ("patch_ids", "patch_id"),
            ("prose", "prose"),
        ):
            plain[name] = [getattr(p, field) for p in self.patches]
        return plain


@dataclass(frozen=True)
class Given:
    """A trailer a reviewer gave in a reply, applied to the series with its provenance."""

    patch: int
    key: str
    person: str  # a [people] key
    message_id: str
    version: int

    @property
    def field(self) -> str:
        return KEYS[self.key]


def sent_records(config: Config) -> tuple[Sent, ...]:
    """Every [[sent]] row, oldest version first; rows whose per-patch lists disagree refused."""
    rows = config.table("sent", SENT)
    found = []
    for index, row in enumerate(rows):
        where = config.where.row("sent", index)
        missing = [k for k in SENT.table.keys if k not in row]
        if missing:
            raise where.error(
                None, f"missing {', '.join(missing)}", "send-series --send writes whole records"
            )
        per_patch = ("patches", "subjects", "patch_ids", "prose")
        lists = [row[k] for k in per_patch]
        if len({len(v) for v in lists}) != 1:
            raise where.error(
                "patches",
                "patches, subjects, patch_ids and prose differ in length",
                "each has one entry per patch, in order",
            )
        patches = tuple(SentPatch(*entry) for entry in zip(*lists, strict=True))
        plain = {
            k: tuple(v) if isinstance(v, list) else v for k, v in row.items() if k not in per_patch
        }
        found.append(Sent(**{**plain, "patches": patches}))
    versions = [s.version for s in found]
    if len(set(versions)) != len(versions):
        raise config.where.rows("sent").error(
            "version", "a version is recorded twice", "keep one [[sent]] per version"
        )
    return tuple(sorted(found, key=lambda s: s.version))


def given_trailers(config: Config, people: set[str], patches: int) -> tuple[Given, ...]:
    """Every [[trailer]] row, its patch and person checked against the series."""
    found = []
    for index, row in enumerate(config.table("trailer", TRAILER)):
        where = config.where.row("trailer", index)
        missing = [k for k in TRAILER.table.keys if k not in row]
        if missing:
            raise where.error(None, f"missing {', '.join(missing)}", "trailers --apply writes them")
        if row["patch"] > patches:
            raise where.error("patch", f"no patch {row['patch']}", f"the series has {patches}")
        if row["person"] not in people:
            raise where.error(
                "person", f"unknown person {row['person']!r}", f"add [people.{row['person']}]"
            )
        found.append(Given(**row))
    return tuple(found)


def archive(config: Config) -> tuple[str, float]:
    """The public-inbox the replies are read from ([review] archive), and its timeout."""
    table = config.table("review", REVIEW)
    return table.get("archive") or DEFAULT_ARCHIVE, float(table.get("timeout", 30))


# --- writing ----------------------------------------------------------------------------------


def review_file(config: Config) -> Path:
    return config.directory / FILE


HEADER = (
    "# The review loop's facts, committed with the series: [[sent]] is written by\n"
    "# `invoke send-series --send` for each version sent, [[trailer]] by `invoke trailers\n"
    "# --apply` for each trailer taken from a reply (message_id says which).\n"
)


def _edit(path: Path) -> Any:
    import tomlkit

    return tomlkit.parse(path.read_text() if path.exists() else HEADER)


def _rows(doc: Any, name: str) -> Any:
    import tomlkit

    if name not in doc:
        doc[name] = tomlkit.aot()
    return doc[name]


class Edit:
    """Changes to configs/ files, written together: each file atomically, and all put back as
    they were if the series no longer loads after them (nothing half-applied)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.docs: dict[Path, Any] = {}
        self.read: dict[Path, bytes | None] = {}  # each file as the edit read it
        self.before: dict[Path, bytes | None] = {}

    def doc(self, name: str) -> Any:
        path = self.config.directory / name
        if path not in self.docs:
            self.read[path] = path.read_bytes() if path.exists() else None
            self.docs[path] = _edit(path)
        return self.docs[path]

    def add_sent(self, record: Sent) -> None:
        _rows(self.doc(FILE), "sent").append(record.to_toml())

    def add_given(self, given: Given) -> None:
        _rows(self.doc(FILE), "trailer").append(
            {k: getattr(given, k) for k in ("patch", "key", "person", "message_id", "version")}
        )

    def add_person(self, key: str, name: str, email: str, source: str) -> None:
        import tomlkit

        table = tomlkit.table()
        table.add(tomlkit.comment(f"from {source}"))
        table["name"], table["email"] = name, email
        self.doc("series.toml")["people"][key] = table

    def set_version(self, version: int) -> None:
        local = self.config.source("local.toml")
        if local and local.has(("series", "version")):
            raise ToolkitError(
                f"{local.path}: [series] version is set there, over series.toml's",
                "drop it from local.toml: the version is the series' data",
            )
        self.doc("series.toml")["series"]["version"] = version

    def write(self, check: Any) -> None:
        """Write every edited file, then run `check` (e.g. load the series); if it raises,
        every file is put back and the error goes on."""
        import tomlkit

        # One writer at a time; one that finds a file changed since it read it (another
        # task's edit) is refused rather than writing over that edit.
        with exclusive(self.config.project / "out" / ".configs-edit.lock"):
            self.before = {p: p.read_bytes() if p.exists() else None for p in self.docs}
            moved = [p.name for p in self.docs if self.before[p] != self.read[p]]
            if moved:
                raise ToolkitError(
                    f"{', '.join(moved)} changed while this ran (another kseries task?)",
                    "nothing was written: run it again",
                )
            try:
                for path, doc in self.docs.items():
                    write_atomic(path, tomlkit.dumps(doc))
                check(self.config.reload())
            except BaseException:
                self.undo()
                raise

    def undo(self) -> None:
        """Put every file `write` wrote back as it was."""
        for path, old in self.before.items():
            if old is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, old)


def person_key(email: str, taken: set[str]) -> str:
    """A [people] key for a new person: the address's local part, made unique."""
    base = re.sub(r"[^a-z0-9]+", "-", email.split("@")[0].lower()).strip("-") or "person"
    key, n = base, 2
    while key in taken:
        key, n = f"{base}-{n}", n + 1
    return key
