"""Trailers: generated from the series facts in the kernel's order, checked by the kernel's rules.

The rules come from Documentation/process/submitting-patches.rst. The same checker runs on
the trailers we generate and on those parsed back from real commits and mails, so a
hand-edited commit is held to the same standard.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kseries.core.run import run
from kseries.errors import ToolkitError
from kseries.series import Patch, Person, parse_ident

SOB = "Signed-off-by"
CODEV = "Co-developed-by"
IDENTITY_KEYS = {SOB, CODEV, "Suggested-by", "Reported-by", "Acked-by", "Reviewed-by", "Tested-by"}
URL_RE = re.compile(r"^https?://[^\s/]+\.[^\s/]+/\S*$")
# submitting-patches.rst: link to a mailing list archive through lore, by the bare Message-ID;
# maintainer-kvm-x86.rst: "use lore links". The /all/ and /r/ forms resolve the same.
LORE_RE = re.compile(r"^https://lore\.kernel\.org/(?:(?:all|r)/)?[^\s/@<>]+@[^\s/@<>]+/?$")
# submitting-patches.rst: "at least the first 12 characters of the SHA-1 ID, and the one line
# summary", as `git log --pretty='Fixes: %h ("%s")'` writes it.
FIXES_RE = re.compile(r'^[0-9a-f]{12,40} \("[^"\n].*"\)$')

# (series field, trailer key) in the order they precede the sign-off chain.
ATTRIBUTION = (
    ("reported_by", "Reported-by"),
    ("suggested_by", "Suggested-by"),
    ("acked_by", "Acked-by"),
    ("reviewed_by", "Reviewed-by"),
    ("tested_by", "Tested-by"),
)


@dataclass(frozen=True)
class Trailer:
    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}: {self.value}"

    @classmethod
    def parse(cls, line: str) -> Trailer:
        key, sep, value = line.partition(":")
        if not sep or not key.strip() or " " in key.strip():
            raise ToolkitError(f"'{line}' is not a trailer", "trailers look like 'Key: value'")
        return cls(key.strip(), value.strip())


class TrailerRuleError(ToolkitError):
    """A trailer block breaks one of submitting-patches.rst's rules."""

    def __init__(self, where: str, trailer: Trailer | str, rule: str, hint: str) -> None:
        super().__init__(f"{where}: '{trailer}' breaks the rule: {rule}", hint)


def generate(patch: Patch, submitter: Person) -> list[Trailer]:
    """The trailer block for `patch`, in submitting-patches.rst's order.

    Other co-developers' Co-developed-by/Signed-off-by pairs come first, then the From
    author's Signed-off-by, then the submitter's own pair (or bare Signed-off-by) last,
    as the document's example for a patch submitted by a co-developer shows.
    """
    trailers = [Trailer.parse(raw) for raw in patch.extra_trailers]
    for field_name, key in ATTRIBUTION:
        trailers += [Trailer(key, p.ident) for p in getattr(patch, field_name)]
    trailers += [Trailer("Link", url) for url in patch.links]
    for person in patch.co_developers:
        if person != submitter:
            trailers += [Trailer(CODEV, person.ident), Trailer(SOB, person.ident)]
    trailers.append(Trailer(SOB, patch.author.ident))
    if submitter != patch.author:
        if submitter in patch.co_developers:
            trailers.append(Trailer(CODEV, submitter.ident))
        trailers.append(Trailer(SOB, submitter.ident))
    return trailers


def who(value: str) -> str:
    """One person however `value` quotes the name or cases the address, for comparing:
    `H. Peter Anvin <hpa@zytor.com>` and `"H. Peter Anvin" <HPA@zytor.com>` are the same."""
    address = parse_ident(value)
    return str(address).lower() if address else value.lower()


def check(trailers: Sequence[Trailer], *, author: str, submitter: str, where: str) -> None:
    """Raise TrailerRuleError for the first rule `trailers` breaks; `where` names the patch.

    `author` and `submitter` are "Name <email>"; people compare by `who`, so a From: header
    decoded from RFC 2047 and a plain UTF-8 trailer name the same person."""
    seen: set[tuple[str, str]] = set()
    for index, trailer in enumerate(trailers):
        person = trailer.key in IDENTITY_KEYS
        identity = (trailer.key.lower(), who(trailer.value) if person else trailer.value.lower())
        if identity in seen:
            raise TrailerRuleError(
                where, trailer, "no duplicate trailers", "list each person or link once per patch"
            )
        seen.add(identity)
        if person and parse_ident(trailer.value) is None:
            raise TrailerRuleError(
                where,
                trailer,
                "names and emails are well-formed",
                "use 'Full Name <user@example.org>', the name in double quotes if it has a comma",
            )
        if trailer.key == "Link" and not LORE_RE.match(trailer.value):
            raise TrailerRuleError(
                where,
                trailer,
                "Link values are lore links built from a Message-ID",
                "use https://lore.kernel.org/<message-id>, the Message-ID without its <>",
            )
        if trailer.key == "Closes" and not URL_RE.match(trailer.value):
            raise TrailerRuleError(
                where,
                trailer,
                "Closes values are URLs",
                "use the lore link of the report, or the public bug tracker's URL",
            )
        if trailer.key == "Fixes" and not FIXES_RE.match(trailer.value):
            raise TrailerRuleError(
                where,
                trailer,
                'Fixes values are <12+ hex digits> ("<subject>")',
                "git log -1 --abbrev=12 --pretty='Fixes: %h (\"%s\")' COMMIT writes one",
            )
        if trailer.key == CODEV:
            if who(trailer.value) == who(author):
                raise TrailerRuleError(
                    where,
                    trailer,
                    "the From author is not also Co-developed-by",
                    "drop the author from co_developers",
                )
            following = trailers[index + 1] if index + 1 < len(trailers) else None
            if following is None or (following.key, who(following.value)) != (SOB, identity[1]):
                raise TrailerRuleError(
                    where,
                    trailer,
                    "every Co-developed-by is immediately followed by that person's Signed-off-by",
                    f"put '{SOB}: {trailer.value}' right after it",
                )
    signoffs = [who(t.value) for t in trailers if t.key == SOB]
    if who(author) not in signoffs:
        raise TrailerRuleError(
            where,
            f"From: {author}",
            "the From author has a Signed-off-by",
            "the author must certify the DCO",
        )
    if not signoffs or signoffs[-1] != who(submitter):
        raise TrailerRuleError(
            where,
            f"{SOB}: {submitter}",
            "the last Signed-off-by is the submitter's",
            "the person sending the patch signs off last",
        )


def parse(message: str) -> list[Trailer]:
    """The trailers git itself sees in a commit message (`git interpret-trailers --parse`)."""
    result = run(
        ["git", "-c", "trailer.separators=:", "interpret-trailers", "--parse", "--no-divider"],
        input=message,
    )
    return [Trailer.parse(line) for line in result.stdout.splitlines() if line.strip()]
