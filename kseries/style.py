"""Changelog rules: what a subject and a body must look like before a maintainer reads them.

The rules come from Documentation/process/submitting-patches.rst and maintainer-kvm-x86.rst.
They run on every rendered message before git is touched (so a template that breaks one fails
`invoke changelog` and `invoke rebase`) and again on the mails `invoke send-series` wrote, so a
commit edited by hand is held to the same standard. Only what can be told mechanically,
without false positives, is a rule here; the rest is the reviewer's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kseries.errors import ToolkitError

# maintainer-kvm-x86.rst: "use 75 characters as a firm-but-not-hard limit, and use 80
# characters as a hard limit". Over the firm one send-series warns; over the hard one it is
# an error here, since nothing justifies it.
SUBJECT_LIMIT = 75
SUBJECT_HARD_LIMIT = 80
# submitting-patches.rst: "The body of the explanation, line wrapped at 75 columns".
BODY_WIDTH = 75

# A commit stands alone in git log: its place in a series means nothing there.
SERIES_POSITION_RE = re.compile(r"\b(?:this|previous|next) (?:patch|commit|series)\b", re.I)
# "subsystem: " segments at the start of a subject, when no prefixes are configured.
ANY_PREFIX_RE = re.compile(r"^(?:[^\s:]+: )+")
# A line that cannot be wrapped: one word (a URL, a path), perhaps after a "label:".
UNBREAKABLE_RE = re.compile(r"^\s*(?:\S+:\s+)?\S+$")
ENDING_PUNCTUATION = ".,;:!?"

# Verbs changelogs start with. Only their inflected forms are flagged ("Adds", "Fixed",
# "Returning"), so a word that merely ends in -s, -ed or -ing ("Process", "Embed",
# "Bring") never is: no dictionary is needed, and no imperative is ever refused.
_VERB_WORDS = """
add allow annotate avoid bump call change check clean clear convert copy correct create
define delete deny disable document drop emulate enable ensure exit expose extend factor
fill fix flush force free guard handle honor ignore implement inject introduce keep kill
limit make mark move pass plumb prepare prevent print propagate provide read reduce
refactor register reject release remove rename reorder replace report require reset
restore retry return revert rework save set skip split start stop support switch sync
take teach test track treat trigger unify update use validate verify warn wrap write zap
"""
VERBS = frozenset(_VERB_WORDS.split())
IRREGULAR = {
    "made": "make",
    "kept": "keep",
    "took": "take",
    "taken": "take",
    "wrote": "write",
    "written": "write",
}


class ChangelogRuleError(ToolkitError):
    """A subject or body breaks one of the changelog rules."""

    def __init__(self, where: str, text: str, rule: str, hint: str) -> None:
        super().__init__(f"{where}: '{text}' breaks the rule: {rule}", hint)


def check_commit(subject: str, body: str, *, prefixes: Sequence[str], where: str) -> None:
    """Raise ChangelogRuleError for the first rule a commit message (without its trailer
    block) breaks; `where` names the patch and its template."""
    check_subject(subject, prefixes=prefixes, where=where)
    first = body.split(None, 1)[0] if body.strip() else ""
    if stem := non_imperative(first):
        raise ChangelogRuleError(
            where,
            first,
            "the changelog leads with the change, in the imperative mood",
            f"write '{stem.capitalize()} ...', as an order to the code (maintainer-kvm-x86.rst)",
        )
    if found := SERIES_POSITION_RE.search(body):
        raise ChangelogRuleError(
            where,
            _line_of(body, found.start()),
            'no "this patch", "previous patch" or "previous commit" in a changelog',
            "a commit stands alone in git log: name the change itself, or an applied commit "
            'as commit <12+ hex> ("subject")',
        )
    check_wrapped(body, where=where)


def check_subject(subject: str, *, prefixes: Sequence[str], where: str) -> None:
    """The shortlog: length, "subsystem: " prefix, and a capitalized, imperative summary
    without ending punctuation (maintainer-kvm-x86.rst's Shortlog section)."""
    if len(subject) > SUBJECT_HARD_LIMIT:
        raise ChangelogRuleError(
            where,
            subject,
            f"a subject is at most {SUBJECT_HARD_LIMIT} characters",
            f"it has {len(subject)}; {SUBJECT_LIMIT} is the firm limit, {SUBJECT_HARD_LIMIT} "
            "the hard one (maintainer-kvm-x86.rst)",
        )
    prefix = _prefix(subject, prefixes)
    if not prefix:
        known = ", ".join(f"'{p}'" for p in prefixes)
        raise ChangelogRuleError(
            where,
            subject,
            f"the subject starts with a shortlog prefix ({known})"
            if prefixes
            else "the subject starts with a 'subsystem: ' prefix",
            "prefixes are case sensitive; [series] shortlog_prefixes lists the ones in use",
        )
    summary = subject[len(prefix) :]
    if summary[:1].islower():
        raise ChangelogRuleError(
            where,
            subject,
            "the summary after the prefix starts with a capital letter",
            f"write '{prefix}{summary[:1].upper()}{summary[1:]}'",
        )
    if summary.endswith(tuple(ENDING_PUNCTUATION)):
        raise ChangelogRuleError(
            where,
            subject,
            "the summary has no ending punctuation",
            f"drop the final '{summary[-1]}'",
        )
    first = summary.split(None, 1)[0] if summary.strip() else ""
    if stem := non_imperative(first):
        raise ChangelogRuleError(
            where,
            subject,
            "the summary is in the imperative mood",
            f"start it with '{stem.capitalize()}', not '{first}'",
        )


def check_wrapped(body: str, *, where: str) -> None:
    """Every body line fits in BODY_WIDTH columns, unless it is one word that cannot wrap."""
    for line in body.splitlines():
        if len(line) > BODY_WIDTH and not UNBREAKABLE_RE.match(line):
            raise ChangelogRuleError(
                where,
                line,
                f"body lines are wrapped at {BODY_WIDTH} columns",
                f"it has {len(line)}; only a URL or a path may run longer, on a line of its own",
            )


def non_imperative(word: str) -> str | None:
    """The verb `word` inflects ("Adds", "Fixed", "Returning", "Made"), or None if it is
    no inflection of a verb in VERBS: the imperative itself, or any other word."""
    word = word.lower().strip(",.:;")
    if word in VERBS:
        return None
    if word in IRREGULAR:
        return IRREGULAR[word]
    stems: list[str] = []
    if word.endswith("ies") or word.endswith("ied"):
        stems.append(word[:-3] + "y")
    if word.endswith("es"):
        stems.append(word[:-2])
    if word.endswith("s"):
        stems.append(word[:-1])
    if word.endswith("ed"):
        stems += [word[:-2], word[:-1]]
    if word.endswith("ing"):
        stems += [word[:-3], word[:-3] + "e"]
    # a doubled final consonant: dropped, skipping
    stems += [stem[:-1] for stem in list(stems) if len(stem) > 2 and stem[-1] == stem[-2]]
    return next((stem for stem in stems if stem in VERBS), None)


def _prefix(subject: str, prefixes: Sequence[str]) -> str:
    """The subject's shortlog prefix with its trailing space; "" if it has none allowed."""
    if prefixes:
        return max((p + " " for p in prefixes if subject.startswith(p + " ")), key=len, default="")
    found = ANY_PREFIX_RE.match(subject)
    return found.group(0) if found else ""


def _line_of(text: str, offset: int) -> str:
    """The whole line of `text` that holds `offset`, for an error to quote."""
    start = text.rfind("\n", 0, offset) + 1
    end = text.find("\n", offset)
    return text[start : end if end != -1 else len(text)].strip()
