"""Loading the series definition and rendering it: every refusal names the file and the fault."""

from __future__ import annotations

import re
import subprocess

import pytest

from kseries.changelog import Changelog
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.rebase import Rebase
from kseries.series import load
from kseries.style import ChangelogRuleError
from kseries.trailers import TrailerRuleError
from tests.conftest import Project, git, invoke, one_error


def edit(project: Project, old: str, new: str) -> None:
    path = project.configs / "series.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def refused_before_git(project: Project, match: str, error: type = ToolkitError) -> ToolkitError:
    before = project.snapshot()
    with pytest.raises(error, match=match) as caught:
        Rebase(project.worktree(), project.series(), log=lambda _: None).start(
            remote="kvm-x86", branch="next"
        )
    assert project.snapshot() == before
    return caught.value


def test_the_project_series_loads_and_renders() -> None:
    series = load(Config.load())
    assert series.branch == "kvm-x86-mmu-memory-fault-v2"
    first = Changelog(series).message(series.patches[0])
    assert series.patches[0].author.name == "Anish Moorthy"
    assert first.subject.startswith("KVM: x86/mmu: ")
    assert str(first.trailers[-1]) == "Signed-off-by: Mikhail Malyshev <mike.malyshev@gmail.com>"
    assert all(len(line) <= 75 for line in first.body.splitlines())
    cover = Changelog(series).cover_letter()
    assert "Changes since v1" in cover.body and "{{" not in cover.body


@pytest.mark.parametrize(
    "old, new, match",
    [
        (
            'author = "author"',
            'author = "nobody"',
            r"series.toml: \[\[patch\]\] #1 author: unknown",
        ),
        (
            'email = "ann@example.org"',
            'email = "ann at example"',
            r"\[people.author\]: .*well-formed",
        ),
        ('email = "max@example.org"', 'email = "ANN@example.org"', r"\[people.maint\]: .*also"),
        ("version = 2", 'version = "two"', r"\[series\]: version must be a positive integer"),
        ('diff = "0001.diff"', 'diff = "0009.diff"', r"#1: diff file .*0009.diff does not exist"),
        ("version = 2", "version = 2\nversion = 3", r"series.toml: Cannot overwrite .*line 5"),
    ],
)
def test_bad_definition_is_refused_with_file_and_key(
    project: Project, old: str, new: str, match: str
) -> None:
    edit(project, old, new)
    with pytest.raises(ToolkitError, match=match):
        project.series()


def test_malformed_patch_file_is_refused(project: Project) -> None:
    (project.root / "patches" / "0002.diff").write_text("diff --git a/file.c b/file.c\n@@ junk\n")
    with pytest.raises(ToolkitError, match=r"0002.diff: not a valid patch"):
        project.series()


def test_trailer_violation_names_patch_trailer_and_rule(project: Project) -> None:
    edit(project, 'co_developers = ["sub"]', 'co_developers = ["author", "sub"]')
    error = refused_before_git(
        project, "the From author is not also Co-developed-by", TrailerRuleError
    )
    assert "patch 1 (0001.diff): 'Co-developed-by: Ann Author <ann@example.org>'" in str(error)


def test_link_that_is_not_a_url_is_refused(project: Project) -> None:
    edit(
        project,
        'links = ["https://lore.kernel.org/all/abc@example.org"]',
        'links = ["abc@example.org"]',
    )
    refused_before_git(
        project,
        r"'Link: abc@example.org' breaks the rule: Link values are lore links built from a "
        "Message-ID",
    )


def test_extra_trailer_breaking_the_pairing_is_refused(project: Project) -> None:
    edit(
        project,
        'author = "sub"',
        'author = "sub"\nextra_trailers = ["Co-developed-by: Max Maintainer <max@example.org>"]',
    )
    refused_before_git(project, "immediately followed by that person's Signed-off-by")


def test_template_with_undefined_variable_names_file_and_line(project: Project) -> None:
    (project.root / "templates" / "0002.j2").write_text(
        "demo: subject\n\nfine line\n{{ patch.reviewer.name }}\n"
    )
    refused_before_git(project, r"templates/0002.j2:4: .*has no attribute 'reviewer'")


def test_template_syntax_error_names_file_and_line(project: Project) -> None:
    (project.root / "templates" / "0001.j2").write_text("demo: subject\n\n{% if %}\n")
    refused_before_git(project, r"templates/0001.j2:3: ")


def test_template_without_body_is_refused(project: Project) -> None:
    (project.root / "templates" / "0001.j2").write_text("demo: subject only\n")
    refused_before_git(project, "renders no body")


@pytest.mark.parametrize(
    "first_line",
    ["{{ series.facts.get('prefix', '') }}", "{% if false %}demo: subject{% endif %}", ""],
)
def test_template_whose_subject_renders_empty_is_refused(project: Project, first_line: str):
    (project.root / "templates" / "0002.j2").write_text(
        f"{first_line}\nAnd line 30 too.\n\nA second paragraph.\n"
    )
    refused_before_git(project, r"templates/0002.j2:1: the subject renders empty")


def test_subject_made_by_a_block_on_line_one_renders_as_written(project: Project) -> None:
    (project.root / "templates" / "0002.j2").write_text(
        "{% if true %}demo: Change line 30{% endif %}\n\n"
        "{% for n in [1, 2] %}\nline {{ n }}\n{% endfor %}\n"
    )
    series = project.series()
    message = Changelog(series).message(series.patches[1])
    assert (message.subject, message.body) == ("demo: Change line 30", "line 1\nline 2")


def test_local_toml_overrides_tracked_settings(project: Project) -> None:
    (project.configs / "local.toml").write_text("[series]\nversion = 3\n")
    assert project.series().branch == "demo-v3"
    assert project.series().subject_prefix == "PATCH v3"


def test_comma_quote_and_non_ascii_names_are_one_person_each_in_git(project: Project) -> None:
    edit(project, 'name = "Ann Author"', 'name = "Bonzini, Paolo"')
    edit(project, 'name = "Max Maintainer"', 'name = "Jörg Rödel"')
    edit(project, 'name = "Sam Submitter"', 'name = "Sam \\"the Sub\\" Submitter"')
    Rebase(project.worktree(), project.series(), log=lambda _: None).start(
        remote="kvm-x86", branch="next"
    )
    tree = project.worktree()
    assert tree.git("log", "-1", "--format=%an <%ae>", "demo-v2~1") == (
        "Bonzini, Paolo <ann@example.org>\n"
    )
    # kernel convention: a comma name in RFC 5322 quotes, a non-ASCII one plain UTF-8
    assert tree.git("log", "-1", "--format=%(trailers)", "demo-v2~1").strip() == (
        "Suggested-by: Jörg Rödel <max@example.org>\n"
        "Link: https://lore.kernel.org/all/abc@example.org\n"
        'Signed-off-by: "Bonzini, Paolo" <ann@example.org>\n'
        'Co-developed-by: "Sam \\"the Sub\\" Submitter" <sam@example.org>\n'
        'Signed-off-by: "Sam \\"the Sub\\" Submitter" <sam@example.org>'
    )


def test_an_unquoted_comma_trailer_is_refused_as_two_addresses(project: Project) -> None:
    edit(
        project,
        'author = "sub"',
        'author = "sub"\nextra_trailers = ["Acked-by: Bonzini, Paolo <pbonzini@redhat.com>"]',
    )
    refused_before_git(project, r"'Acked-by: Bonzini, Paolo <pbonzini@redhat.com>' breaks the rule")


def export(project: Project) -> subprocess.CompletedProcess[str]:
    return invoke(project, "export", "--tree", str(project.tree))


def test_export_of_an_untouched_branch_reports_no_edit(project: Project) -> None:
    Rebase(project.worktree(), project.series(), log=lambda _: None).start(
        remote="kvm-x86", branch="next"
    )
    done = export(project)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "patches/ already matches demo-v2\n"


def test_export_reports_a_message_edited_on_the_branch(project: Project) -> None:
    Rebase(project.worktree(), project.series(), log=lambda _: None).start(
        remote="kvm-x86", branch="next"
    )
    message = git(project.tree, "log", "-1", "--format=%B")
    edited = message.replace("And line 30 too.", "And line 30 too, as review asked.")
    (project.root / "message").write_text(edited)
    git(project.tree, "commit", "-q", "--amend", "-F", str(project.root / "message"))
    templates = {p: p.read_bytes() for p in (project.root / "templates").iterdir()}
    done = export(project)
    template = project.root / "templates" / "0002.j2"
    one_error(
        done,
        "demo-v2: the commit message of patch 2 (0002.diff) was edited and is not exported; "
        f"change {template} instead",
        "the diff above goes from the rendered message to the branch's",
    )
    assert done.stdout.splitlines() == [
        "patches/ already matches demo-v2",  # the diffs are exported all the same
        f"--- {template} (rendered)",
        f"+++ {git(project.tree, 'rev-parse', '--short=12', 'HEAD').strip()} (patch 2 (0002.diff))",
        "@@ -1,5 +1,5 @@",
        " demo: Change line 30",
        " ",
        "-And line 30 too.",
        "+And line 30 too, as review asked.",
        " ",
        " Signed-off-by: Sam Submitter <sam@example.org>",
    ]
    assert {p: p.read_bytes() for p in (project.root / "templates").iterdir()} == templates


# --- the changelog rules: one failing case each, named by template, patch and rule -----------

SUBJECT = "demo: Change line 30"
POSITION = 'no "this patch", "previous patch" or "previous commit" in a changelog'


@pytest.mark.parametrize(
    "text, rule",
    [
        (f"{SUBJECT}\n\nWith the previous patch, line 30 follows.\n", POSITION),
        (f"{SUBJECT}\n\nChange line 30, as this patch must.\n", POSITION),
        (f"{SUBJECT}\n\nChange line 30 as the previous commit did line 10.\n", POSITION),
        ("demo: Change " + "x" * 68 + "\n\nAnd line 30 too.\n", "a subject is at most 80"),
        ("Change line 30\n\nAnd line 30 too.\n", "starts with a 'subsystem: ' prefix"),
        ("demo: change line 30\n\nAnd line 30 too.\n", "starts with a capital letter"),
        (f"{SUBJECT}.\n\nAnd line 30 too.\n", "the summary has no ending punctuation"),
        ("demo: Changes line 30\n\nAnd line 30 too.\n", "the summary is in the imperative mood"),
        (f"{SUBJECT}\n\nChanged line 30 too.\n", "leads with the change, in the imperative"),
        (f"{SUBJECT}\n\n{'word ' * 15}words\n", "body lines are wrapped at 75 columns"),
    ],
)
def test_each_changelog_rule_has_a_failing_case(project: Project, text: str, rule: str) -> None:
    template = project.root / "templates" / "0002.j2"
    template.write_text(text)
    error = refused_before_git(project, re.escape(rule), ChangelogRuleError)
    assert str(error).startswith(f"{template}: patch 2 (0002.diff): '")


def test_a_subject_outside_the_configured_prefixes_is_refused(project: Project) -> None:
    edit(project, "version = 2", 'version = 2\nshortlog_prefixes = ["demo:", "demo/sub:"]')
    (project.root / "templates" / "0002.j2").write_text("Demo: Change line 30\n\nAnd it.\n")
    refused_before_git(
        project,
        re.escape("the subject starts with a shortlog prefix ('demo:', 'demo/sub:')"),
        ChangelogRuleError,
    )


def test_the_cover_letter_is_held_to_the_subject_rules(project: Project) -> None:
    template = project.root / "templates" / "cover.j2"
    template.write_text("demo: the cover\n\nTwo patches.\n")
    error = refused_before_git(project, "starts with a capital letter", ChangelogRuleError)
    assert str(error).startswith(f"{template}: the cover letter: 'demo: the cover' breaks")


def test_what_the_rules_must_not_refuse_renders(project: Project) -> None:
    url = "https://lore.kernel.org/all/" + "x" * 70 + "@example.org"
    (project.root / "templates" / "0002.j2").write_text(
        # an imperative ending in -ss, a 75-column line, an unbreakable URL, "patch" alone
        f"demo/sub: Process line 30\n\nAddress line 30 {'x' * 59}\n{url}\nLink:  {url}\n"
        "Patch line 30 as the other patch in this file did.\n"
    )
    series = project.series()
    assert Changelog(series).message(series.patches[1]).subject == "demo/sub: Process line 30"
