"""The series as data: people, the base it goes on, and its patches in order.

Each patch is a diff in patches/ plus facts from configs/series.toml (author, co-developers,
who suggested it, links, which template writes its changelog). Loading checks everything a
later stage relies on, so a bad definition fails before git is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from email.errors import ObsoleteHeaderDefect
from email.headerregistry import Address, HeaderRegistry
from pathlib import Path
from typing import Any

from kseries.config import (
    ANY_TABLE,
    DATE,
    INTEGER,
    STRING,
    STRINGS,
    Config,
    Keys,
    Kind,
    Names,
    Rows,
    Where,
)
from kseries.core.files import write_atomic
from kseries.core.run import Ran, run
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.review.data import Given, Sent, given_trailers, sent_records

# A plain dot-atom address (no quoted local part), and a name with no <, > or @ in it.
EMAIL_RE = re.compile(r"^[\w!#$%&'*+/=?^`{|}~.-]+@[\w-]+(?:\.[\w-]+)+$", re.ASCII)
NAME_RE = re.compile(r"^[^<>@\s](?:[^<>@\x00-\x1f\x7f]*[^<>@\s])?$")
_HEADERS = HeaderRegistry()
PERSON_FIELDS = ("suggested_by", "reported_by", "acked_by", "reviewed_by", "tested_by")


@dataclass(frozen=True)
class Person:
    key: str
    name: str
    email: str

    @property
    def ident(self) -> str:
        """The "Name <email>" form trailers and From: lines use (see `ident`)."""
        return ident(self.name, self.email)


def ident(name: str, email: str) -> str:
    """The "Name <email>" of trailers and From: lines, the name quoted only where RFC 5322
    needs it (a comma, a dot, a quote) so git and mail readers see one address; non-ASCII
    stays plain UTF-8, as kernel trailers write it (mail headers encode it as they are written)."""
    return str(Address(display_name=name, addr_spec=email))


def parse_addresses(value: str) -> list[Address] | None:
    """The addresses in `value`, read as a To: header reads them; None if any is malformed.

    Obsolete syntax passes: people write `H. Peter Anvin <hpa@zytor.com>` unquoted, and it
    still means one person. An unquoted comma does not: `Bonzini, Paolo <...>` is two.
    """
    header = _HEADERS("To", value)
    if any(not isinstance(d, ObsoleteHeaderDefect) for d in header.defects):
        return None
    found = list(header.addresses)
    if not found or not all(EMAIL_RE.match(a.addr_spec) for a in found):
        return None
    return found


def parse_ident(value: str) -> Address | None:
    """The one named address `value` holds ("Name <email>"), or None if it holds anything else."""
    found = parse_addresses(value)
    if found is None or len(found) != 1 or not found[0].display_name:
        return None
    return found[0]


@dataclass(frozen=True)
class Base:
    """Where the series goes: a remote (its name and canonical URL) and a branch on it."""

    remote: str
    url: str
    branch: str

    @property
    def tracking_ref(self) -> str:
        return f"refs/remotes/{self.remote}/{self.branch}"


@dataclass(frozen=True)
class Patch:
    number: int
    template: str
    diff: Path
    author: Person
    co_developers: tuple[Person, ...] = ()
    suggested_by: tuple[Person, ...] = ()
    reported_by: tuple[Person, ...] = ()
    acked_by: tuple[Person, ...] = ()
    reviewed_by: tuple[Person, ...] = ()
    tested_by: tuple[Person, ...] = ()
    links: tuple[str, ...] = ()
    extra_trailers: tuple[str, ...] = ()
    date: str | None = None

    @property
    def label(self) -> str:
        """How errors name the patch: its number and diff file."""
        return f"patch {self.number} ({self.diff.name})"


@dataclass(frozen=True)
class Series:
    name: str
    version: int
    submitter: Person
    base: Base
    patches: tuple[Patch, ...]
    people: dict[str, Person]
    cover_template: str
    templates_dir: Path
    patches_dir: Path
    source: Path
    facts: dict[str, Any] = field(default_factory=dict)
    shortlog_prefixes: tuple[str, ...] = ()
    change_id: str = ""  # b4's change-id: the same in every version's cover letter
    sent: tuple[Sent, ...] = ()  # configs/review.toml: each version sent, oldest first
    given: tuple[Given, ...] = ()  # configs/review.toml: trailers taken from replies
    companions: tuple[str, ...] = ()  # series names (--series): each cover letter links the other
    configs: Path | None = None  # the project's configs/, where the companions are found

    @property
    def branch(self) -> str:
        """The versioned branch the series lives on, e.g. name-v2."""
        return f"{self.name}-v{self.version}"

    @property
    def committer_env(self) -> dict[str, str]:
        """The submitter applies and formats the series, whatever the machine's git identity."""
        who = self.submitter
        return {"GIT_COMMITTER_NAME": who.name, "GIT_COMMITTER_EMAIL": who.email}

    @property
    def subject_prefix(self) -> str:
        return "PATCH" if self.version == 1 else f"PATCH v{self.version}"


SERIES = Keys(
    {
        "name": STRING,
        "version": Kind("a positive integer", lambda v: INTEGER.accepts(v) and v >= 1, "2"),
        "submitter": STRING,
        "cover_template": STRING,
        "patches_dir": STRING,
        "templates_dir": STRING,
        "shortlog_prefixes": STRINGS,  # the subsystem's topics ("KVM: x86/mmu:"), for subjects
        "change_id": STRING,  # b4's `change-id:`, so a maintainer's b4 sees v3 follow v2
        "companions": STRINGS,  # the series this one is half of, by their --series names
        "facts": ANY_TABLE,  # free-form, for the templates: series.facts.v1_link
    }
)
BASE = Keys({"remote": STRING, "url": STRING, "branch": STRING})
PEOPLE = Names(Keys({"name": STRING, "email": STRING}))
PATCHES = Rows(
    Keys(
        {
            "diff": STRING,
            "template": STRING,
            "author": STRING,
            "date": DATE,
            "co_developers": STRINGS,
            **dict.fromkeys(PERSON_FIELDS, STRINGS),
            "links": STRINGS,
            "extra_trailers": STRINGS,
        }
    )
)


class _Reader:
    """Reads the series tables against their schemas, so every error names the file it
    came from (series.toml or local.toml), the table and the key."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.top = config.where

    def fail(self, where: Where, key: str | None, problem: str, hint: str) -> ToolkitError:
        """`FILE: [table] key: problem`, FILE being the one `key` (or the table) came from."""
        named = f"{where.label} {key}" if key else where.label
        return ToolkitError(f"{where.file(key)}: {named}: {problem}", hint)

    def required(self, where: Where, table: dict[str, Any], key: str) -> Any:
        """A setting a later stage cannot do without (its type the schema checked)."""
        value = table.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise self.fail(where, key, "is not set", f"set {key} in {where.label}")
        return value

    def people(self) -> dict[str, Person]:
        people: dict[str, Person] = {}
        seen: dict[str, str] = {}
        for key, entry in self.config.table("people", PEOPLE).items():
            where = self.top.table("people").table(key)
            person = Person(
                key, self.required(where, entry, "name"), self.required(where, entry, "email")
            )
            if not (NAME_RE.match(person.name) and EMAIL_RE.match(person.email)):
                raise self.fail(
                    where,
                    None,
                    f"'{person.name} <{person.email}>' is not a well-formed identity",
                    "use a real name (no <, > or @) and an address like user@example.org",
                )
            address = person.email.lower()
            if address in seen:
                raise self.fail(
                    where,
                    None,
                    f"{person.email} is also [people.{seen[address]}]",
                    "list each person once and refer to them by key",
                )
            seen[address] = key
            people[key] = person
        return people

    def person(self, people: dict[str, Person], key: str, where: Where, field: str) -> Person:
        if key not in people:
            raise self.fail(
                where,
                field,
                f"unknown person {key!r}",
                f"add [people.{key}] or use one of: {', '.join(sorted(people))}",
            )
        return people[key]

    def persons(
        self, people: dict[str, Person], table: dict[str, Any], key: str, where: Where
    ) -> tuple[Person, ...]:
        return tuple(self.person(people, v, where, key) for v in table.get(key, []))

    def patch(
        self, number: int, table: dict[str, Any], people: dict[str, Person], patches_dir: Path
    ) -> Patch:
        where = self.top.row("patch", number - 1)
        diff = patches_dir / self.required(where, table, "diff")
        if not diff.is_file():
            raise self.fail(
                where, None, f"diff file {diff} does not exist", "run `invoke export` or fix 'diff'"
            )
        return Patch(
            number=number,
            template=self.required(where, table, "template"),
            diff=diff,
            author=self.person(people, self.required(where, table, "author"), where, "author"),
            co_developers=self.persons(people, table, "co_developers", where),
            links=tuple(table.get("links", ())),
            extra_trailers=tuple(table.get("extra_trailers", ())),
            date=table.get("date"),
            **{name: self.persons(people, table, name, where) for name in PERSON_FIELDS},
        )


def load(config: Config | None = None) -> Series:
    """Load the series definition; refuse it if any fact a later stage needs is wrong."""
    config = config or Config.load()
    reader = _Reader(config)
    people = reader.people()
    info = config.table("series", SERIES)
    base = config.table("base", BASE)
    entries = config.table("patch", PATCHES)
    # Another series' data sits beside the default's: patches/KEY/, templates/KEY/.
    key = config.series_key
    patches_dir = config.path("series.patches_dir") or config.project / "patches" / key
    templates_dir = config.path("series.templates_dir") or config.project / "templates" / key
    if not entries:
        raise reader.fail(
            reader.top.rows("patch"),
            None,
            "the series has no patches",
            "add a [[patch]] table",
        )
    top = reader.top.table("series")
    on = reader.top.table("base")
    patches = [
        reader.patch(n, entry, people, patches_dir) for n, entry in enumerate(entries, start=1)
    ]
    given = given_trailers(config, set(people), len(patches))
    series = Series(
        name=reader.required(top, info, "name"),
        version=reader.required(top, info, "version"),
        submitter=reader.person(people, reader.required(top, info, "submitter"), top, "submitter"),
        base=Base(
            remote=reader.required(on, base, "remote"),
            url=reader.required(on, base, "url"),
            branch=reader.required(on, base, "branch"),
        ),
        patches=tuple(_with_given(p, given, people) for p in patches),
        people=people,
        cover_template=reader.required(top, info, "cover_template"),
        templates_dir=templates_dir,
        patches_dir=patches_dir,
        source=config.directory / "series.toml",
        facts=info.get("facts", {}),
        shortlog_prefixes=tuple(info.get("shortlog_prefixes", ())),
        change_id=info.get("change_id", ""),
        sent=sent_records(config),
        given=given,
        companions=tuple(info.get("companions", ())),
        configs=config.configs,
    )
    check_diffs([patch.diff for patch in series.patches])
    return series


def _with_given(patch: Patch, given: tuple[Given, ...], people: dict[str, Person]) -> Patch:
    """`patch` with the trailers reviewers gave it in replies (configs/review.toml) added to
    its facts; one also typed into series.toml is kept once."""
    extra: dict[str, tuple[Person, ...]] = {}
    for entry in given:
        if entry.patch == patch.number:
            have = extra.get(entry.field, getattr(patch, entry.field))
            if people[entry.person] not in have:
                extra[entry.field] = (*have, people[entry.person])
    return replace(patch, **extra) if extra else patch


def check_diffs(paths: list[Path]) -> None:
    """Refuse a diff file git cannot parse, naming the file and git's complaint.

    One `git apply --numstat` reads them all; only a failure is narrowed down file by file.
    """
    every = _numstat(paths)
    # each diff touches at least one file, so fewer numstat lines than files means an empty one
    if every.ok and len(every.stdout.splitlines()) >= len(paths):
        return
    for path in paths:
        _check_one(path)


def _numstat(paths: list[Path]) -> Ran:
    return run(["git", "apply", "--numstat", *paths], check=False)


def _check_one(path: Path) -> None:
    result = _numstat([path])
    if not result.ok or not result.stdout.strip():
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no diff"
        raise ToolkitError(
            f"{path}: not a valid patch: {detail}",
            "patches/ holds plain `git diff` output; regenerate it with `invoke export`",
        )


@dataclass(frozen=True)
class Exported:
    """What `export` did: the diff files it rewrote, and the commits it read, in series order."""

    changed: list[Path]
    commits: list[str]


def export(tree: WorkTree, series: Series, ref: str, base: str) -> Exported:
    """Write the diffs of base..ref back into patches/, so hand-resolved work becomes the data.

    Commit messages are not exported: they come from templates/, so the caller compares the
    returned commits' messages with the rendered ones and reports an edit
    (`Changelog.edits`), rather than keeping it silently or dropping it silently.
    """
    commits = tree.git("rev-list", "--reverse", f"{base}..{ref}").split()
    if len(commits) != len(series.patches):
        raise ToolkitError(
            f"{tree.path}: {ref} has {len(commits)} commits on {base[:12]}, the series "
            f"defines {len(series.patches)}",
            f"add or remove [[patch]] entries in {series.source} to match the branch",
        )
    changed = []
    for sha, patch in zip(commits, series.patches, strict=True):
        diff = commit_diff(tree, sha)
        if not patch.diff.exists() or patch.diff.read_text() != diff:
            write_atomic(patch.diff, diff)
            changed.append(patch.diff)
    return Exported(changed, commits)


def commit_diff(tree: WorkTree, sha: str) -> str:
    """A commit's diff as patches/ keeps it."""
    return tree.git(
        *DIFF_OPTIONS, "show", "--format=", "--no-color", "--no-ext-diff", "--patch", sha
    )


# Diffs stay in one shape whatever the user's git config says about prefixes.
DIFF_OPTIONS = (
    "-c",
    "diff.noprefix=false",
    "-c",
    "diff.mnemonicPrefix=false",
    "-c",
    "diff.relative=false",
)
