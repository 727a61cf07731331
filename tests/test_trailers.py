"""The trailer rules of submitting-patches.rst: generated order, and one failing case per rule."""

from __future__ import annotations

import pytest

from kseries import trailers
from kseries.series import Patch, Person
from kseries.trailers import Trailer, TrailerRuleError

ANISH = Person("anish", "Anish Moorthy", "amoorthy@google.com")
MIKHAIL = Person("mikhail", "Mikhail Malyshev", "mike.malyshev@gmail.com")
SEAN = Person("sean", "Sean Christopherson", "seanjc@google.com")
OTHER = Person("other", "Other Dev", "other@example.org")


def patch(**facts) -> Patch:
    return Patch(
        number=1,
        template="t.j2",
        diff=__import__("pathlib").Path("0001.diff"),
        **{"author": ANISH, **facts},
    )


def block(*lines: str) -> list[Trailer]:
    return [Trailer.parse(line) for line in lines]


def check(lines: list[Trailer], author: Person = ANISH, submitter: Person = MIKHAIL) -> None:
    trailers.check(lines, author=author.ident, submitter=submitter.ident, where="patch 1 (x)")


def test_patch_one_order_follows_the_co_developer_submission_example() -> None:
    got = trailers.generate(
        patch(
            co_developers=(MIKHAIL,),
            suggested_by=(SEAN,),
            links=("https://lore.kernel.org/all/Zr-8M9rYplgN6IS3@google.com",),
        ),
        MIKHAIL,
    )
    assert [str(t) for t in got] == [
        "Suggested-by: Sean Christopherson <seanjc@google.com>",
        "Link: https://lore.kernel.org/all/Zr-8M9rYplgN6IS3@google.com",
        "Signed-off-by: Anish Moorthy <amoorthy@google.com>",
        "Co-developed-by: Mikhail Malyshev <mike.malyshev@gmail.com>",
        "Signed-off-by: Mikhail Malyshev <mike.malyshev@gmail.com>",
    ]
    check(got)


def test_other_co_developers_pair_before_the_author_and_submitter_signs_last() -> None:
    got = trailers.generate(patch(co_developers=(OTHER, MIKHAIL)), MIKHAIL)
    assert [t.value for t in got] == [
        OTHER.ident,
        OTHER.ident,
        ANISH.ident,
        MIKHAIL.ident,
        MIKHAIL.ident,
    ]
    assert [t.key for t in got][:2] == ["Co-developed-by", "Signed-off-by"]
    check(got)


def test_submitter_who_is_the_author_signs_once() -> None:
    got = trailers.generate(patch(author=MIKHAIL, suggested_by=(SEAN,)), MIKHAIL)
    assert [str(t) for t in got][-1] == f"Signed-off-by: {MIKHAIL.ident}"
    assert sum(t.key == "Signed-off-by" for t in got) == 1
    check(got, author=MIKHAIL)


GOOD_TAIL = (
    f"Signed-off-by: {ANISH.ident}",
    f"Co-developed-by: {MIKHAIL.ident}",
    f"Signed-off-by: {MIKHAIL.ident}",
)


@pytest.mark.parametrize(
    "lines, rule",
    [
        (
            (
                f"Signed-off-by: {ANISH.ident}",
                f"Co-developed-by: {MIKHAIL.ident}",
                f"Suggested-by: {SEAN.ident}",
                f"Signed-off-by: {MIKHAIL.ident}",
            ),
            "immediately followed by that person's Signed-off-by",
        ),
        (
            (f"Signed-off-by: {OTHER.ident}", f"Signed-off-by: {MIKHAIL.ident}"),
            "the From author has a Signed-off-by",
        ),
        (
            (f"Signed-off-by: {MIKHAIL.ident}", f"Signed-off-by: {ANISH.ident}"),
            "the last Signed-off-by is the submitter's",
        ),
        (
            (f"Suggested-by: {SEAN.ident}", f"Suggested-by: {SEAN.ident}", *GOOD_TAIL),
            "no duplicate trailers",
        ),
        (
            ("Link: lore.kernel.org/all/Zr-8M9rYplgN6IS3@google.com", *GOOD_TAIL),
            "Link values are lore links built from a Message-ID",
        ),
        (
            ("Link: https://lkml.org/lkml/2024/8/16/1055", *GOOD_TAIL),
            "Link values are lore links built from a Message-ID",
        ),
        (
            ("Link: https://lore.kernel.org/all/?q=memory_fault", *GOOD_TAIL),
            "Link values are lore links built from a Message-ID",
        ),
        (("Closes: bug 1234", *GOOD_TAIL), "Closes values are URLs"),
        (
            ('Fixes: 16f95f3b ("KVM: Add KVM_EXIT_MEMORY_FAULT exit")', *GOOD_TAIL),
            r'Fixes values are <12\+ hex digits> \("<subject>"\)',
        ),
        (
            ("Fixes: 16f95f3b95ca KVM: Add KVM_EXIT_MEMORY_FAULT exit", *GOOD_TAIL),
            r'Fixes values are <12\+ hex digits> \("<subject>"\)',
        ),
        (
            ("Suggested-by: Sean Christopherson seanjc@google.com", *GOOD_TAIL),
            "names and emails are well-formed",
        ),
        (("Suggested-by: Sean <seanjc@localhost>", *GOOD_TAIL), "names and emails are well-formed"),
        (
            (f"Co-developed-by: {ANISH.ident}", *GOOD_TAIL),
            "the From author is not also Co-developed-by",
        ),
    ],
)
def test_each_rule_has_a_failing_case(lines: tuple[str, ...], rule: str) -> None:
    with pytest.raises(TrailerRuleError, match=rule) as error:
        check(block(*lines))
    assert str(error.value).startswith("patch 1 (x): '")


@pytest.mark.parametrize(
    "line",
    [
        "Link: https://lore.kernel.org/Zr-8M9rYplgN6IS3@google.com",
        "Link: https://lore.kernel.org/all/20240809205158.1340255-3-amoorthy@google.com/",
        "Link: https://lore.kernel.org/r/30th.anniversary.repost@klaava.Helsinki.FI",
        "Closes: https://bugzilla.kernel.org/show_bug.cgi?id=1234",
        'Fixes: 16f95f3b95ca ("KVM: Add KVM_EXIT_MEMORY_FAULT exit to report faults to userspace")',
    ],
)
def test_lore_links_and_a_well_formed_fixes_pass(line: str) -> None:
    check(block(line, *GOOD_TAIL))


def test_parse_reads_what_git_sees() -> None:
    message = "subject\n\nbody: not a trailer here\n\n" + "\n".join(GOOD_TAIL) + "\n"
    assert [str(t) for t in trailers.parse(message)] == list(GOOD_TAIL)
