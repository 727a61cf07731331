"""Every rebase path against real, throwaway git repositories."""

from __future__ import annotations

import subprocess

import pytest

from kseries.errors import ToolkitError
from kseries.rebase import ConflictError, Rebase
from tests.conftest import ENV, SOURCE, Project, git, make_diff, replace_line


def run(project: Project, fetch: bool = True):
    return Rebase(project.worktree(), project.series(), log=lambda _: None).start(
        remote="kvm-x86", branch="next", fetch=fetch
    )


def test_clean_apply_builds_versioned_branch_with_authors_and_trailers(project: Project) -> None:
    result = run(project)
    tree = project.tree
    assert result.branch == "demo-v2"
    assert git(tree, "symbolic-ref", "HEAD").strip() == "refs/heads/demo-v2"
    assert git(tree, "status", "--porcelain") == ""
    assert [s for _, s in result.commits] == ["demo: Change line 10", "demo: Change line 30"]
    authors = git(
        tree, "log", "--reverse", "--format=%an <%ae>|%cn|%ad", "--date=iso", "kvm-x86/next.."
    ).splitlines()
    assert authors[0] == "Ann Author <ann@example.org>|Sam Submitter|2024-08-09 20:51:58 +0000"
    assert authors[1].startswith("Sam Submitter <sam@example.org>|Sam Submitter|")
    first = git(tree, "log", "-1", "--format=%B", "demo-v2~1")
    assert first.endswith(
        "Suggested-by: Max Maintainer <max@example.org>\n"
        "Link: https://lore.kernel.org/all/abc@example.org\n"
        "Signed-off-by: Ann Author <ann@example.org>\n"
        "Co-developed-by: Sam Submitter <sam@example.org>\n"
        "Signed-off-by: Sam Submitter <sam@example.org>\n\n"
    )
    assert "Change line 10, so that Ann Author's fix is in." in first
    assert git(tree, "config", "branch.demo-v2.description").startswith("demo: The cover\n")
    assert "line 30 fixed" in (tree / "file.c").read_text()
    assert result.base == git(tree, "rev-parse", "kvm-x86/next").strip()


def test_fetch_takes_the_new_base(project: Project) -> None:
    new_base = project.upstream_commit(SOURCE + "line 41\n")
    assert run(project).base == new_base


def test_no_fetch_uses_the_tracking_ref(project: Project) -> None:
    old_base = git(project.tree, "rev-parse", "kvm-x86/next").strip()
    project.upstream_commit(SOURCE + "line 41\n")
    assert run(project, fetch=False).base == old_base


def test_context_drift_is_merged_three_way(project: Project) -> None:
    # lines 7 and 13 are the hunk's context: plain `git apply` fails, a 3-way merge does not
    drifted = replace_line(replace_line(SOURCE, 7, "line 7 changed upstream"), 13, "line 13 too")
    project.upstream_commit("new header\n" * 5 + drifted)
    run(project)
    text = (project.tree / "file.c").read_text()
    assert "line 7 changed upstream\nline 8\nline 9\nline 10 fixed\n" in text
    assert "line 30 fixed" in text


def test_conflict_stops_with_report_then_continue(project: Project) -> None:
    project.upstream_commit(replace_line(SOURCE, 30, "line 30 rewritten upstream"))
    with pytest.raises(ConflictError) as stop:
        run(project)
    report = str(stop.value)
    assert "patch 2 (0002.diff)" in report
    assert "file.c:" in report and "invoke rebase --continue" in report
    assert stop.value.files == ["file.c"]
    with pytest.raises(ToolkitError, match="already in progress"):
        run(project)
    text = (project.tree / "file.c").read_text()
    resolved = (
        text.split("<<<<<<<")[0] + "line 30 both\n" + text.split(">>>>>>>")[1].split("\n", 1)[1]
    )
    (project.tree / "file.c").write_text(resolved)
    git(project.tree, "add", "file.c")
    result = Rebase(project.worktree(), project.series(), log=lambda _: None).resume()
    assert len(result.commits) == 2
    assert "line 30 both" in git(project.tree, "show", "demo-v2:file.c")
    assert git(project.tree, "status", "--porcelain") == ""


def test_abort_restores_exact_previous_state(project: Project) -> None:
    run(project)  # an earlier attempt exists, so abort must restore it too
    git(project.tree, "checkout", "-q", "master")
    project.upstream_commit(replace_line(SOURCE, 10, "line 10 rewritten upstream"))
    before = project.snapshot()
    with pytest.raises(ConflictError):
        run(project)
    assert project.snapshot() != before
    Rebase(project.worktree(), project.series(), log=lambda _: None).abort()
    after = project.snapshot()
    # the fetch legitimately moved the remote-tracking ref; nothing else may differ
    strip = [line for line in before[0].splitlines() if "refs/remotes/" not in line]
    assert [line for line in after[0].splitlines() if "refs/remotes/" not in line] == strip
    assert after[1:] == before[1:]


def test_abort_without_a_run_is_refused(project: Project) -> None:
    with pytest.raises(ToolkitError, match="no kseries rebase in progress"):
        Rebase(project.worktree(), project.series(), log=lambda _: None).abort()


def test_rerun_keeps_previous_attempt_and_prints_range_diff(project: Project) -> None:
    first = run(project)
    second = run(project)
    assert second.backup_ref == "refs/kseries/attempts/demo-v2/1"
    assert git(project.tree, "rev-parse", second.backup_ref).strip() == first.commits[-1][0]
    assert "1:  " in second.range_diff and " = " in second.range_diff
    (project.root / "templates" / "0002.j2").write_text("demo: Change line 30\n\nReworded.\n")
    third = run(project)
    assert third.backup_ref == "refs/kseries/attempts/demo-v2/2"
    assert " ! " in third.range_diff and "Reworded." in third.range_diff


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda p: (p.tree / "file.c").write_text("dirty\n"), "uncommitted changes"),
        (
            lambda p: git(p.tree, "remote", "rename", "kvm-x86", "other"),
            "no remote named 'kvm-x86'",
        ),
    ],
)
def test_refusals_change_nothing(project: Project, make_bad, message: str) -> None:
    make_bad(project)
    before = project.snapshot()
    with pytest.raises(ToolkitError, match=message):
        run(project)
    assert project.snapshot() == before


def test_mid_am_tree_is_refused(project: Project) -> None:
    stale = make_diff("other\n" * 5, "changed\n" * 5, project.root / "stale")
    (project.root / "stale.mbox").write_text(
        "From: X <x@example.org>\nSubject: x\n\nx\n---\n" + stale
    )
    stuck = subprocess.run(
        ["git", "am", str(project.root / "stale.mbox")],
        cwd=project.tree,
        capture_output=True,
        env={**ENV, "PATH": "/usr/bin:/bin"},
    )
    assert stuck.returncode != 0
    before = project.snapshot()
    with pytest.raises(ToolkitError, match="in the middle of an am or rebase"):
        run(project)
    assert project.snapshot() == before


def test_missing_tree_is_refused(project: Project) -> None:
    from kseries.gitrepo import WorkTree

    with pytest.raises(ToolkitError, match="does not exist"):
        WorkTree(project.root / "nowhere")


def test_missing_base_with_no_fetch_is_refused(project: Project) -> None:
    git(project.tree, "update-ref", "-d", "refs/remotes/kvm-x86/next")
    before = project.snapshot()
    with pytest.raises(ToolkitError, match="refs/remotes/kvm-x86/next does not exist"):
        run(project, fetch=False)
    assert project.snapshot() == before


def test_conflict_without_merge_base_names_hunks_and_reject_path(project: Project) -> None:
    """Patches made elsewhere name blobs this tree lacks: the report still names the hunks."""
    foreign = make_diff(SOURCE, replace_line(SOURCE, 10, "line 10 fixed"), project.root / "f")
    (project.root / "patches" / "0001.diff").write_text(
        foreign.replace("index ", "index 1234567", 1).replace(
            "1234567" + foreign.split("index ")[1].split("..")[0], "1234567", 1
        )
    )
    project.upstream_commit(replace_line(SOURCE, 10, "line 10 rewritten upstream"))
    with pytest.raises(ConflictError) as stop:
        run(project)
    assert "patch 1 (0001.diff)" in str(stop.value)
    assert "file.c:7" in str(stop.value)
    assert "apply --reject" in str(stop.value)
