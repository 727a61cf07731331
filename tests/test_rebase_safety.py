"""A rebase never races another one, never moves a branch another worktree has checked out,
and can always be aborted, even when its state file was cut short."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from kseries.errors import ToolkitError
from kseries.paths import PROJECT
from kseries.rebase import ConflictError, Rebase, RebaseProgress
from tests.conftest import SOURCE, Project, git, replace_line

INVOKE = str(PROJECT / ".venv/bin/invoke")


def rebase(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    """A real `invoke rebase` in its own process, as a user in another terminal runs it."""
    return subprocess.run(
        [INVOKE, "-r", str(PROJECT), "rebase", "--tree", str(project.tree), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "KSERIES_CONFIG_DIR": str(project.configs)},
        timeout=120,
    )


def attempts(project: Project) -> list[str]:
    return git(project.tree, "for-each-ref", "--format=%(refname)", "refs/kseries/").split()


def test_a_second_rebase_on_the_same_tree_is_refused_and_changes_nothing(project: Project) -> None:
    assert rebase(project).returncode == 0  # a series branch exists: the next run backs it up
    # git am runs this hook inside the winner's run, so the loser is sure to meet its lock.
    hook = project.tree / ".git/hooks/pre-applypatch"
    hook.write_text("#!/bin/sh\nsleep 3\n")
    hook.chmod(0o755)
    env = {**os.environ, "KSERIES_CONFIG_DIR": str(project.configs)}
    winner = subprocess.Popen(
        [INVOKE, "-r", str(PROJECT), "rebase", "--tree", str(project.tree)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lock = project.tree / ".git/kseries/rebase.lock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        lock.is_file() and lock.read_text().strip() == str(winner.pid)
    ):
        time.sleep(0.05)
    loser = rebase(project)
    _, err = winner.communicate(timeout=120)
    assert winner.returncode == 0, err
    assert loser.returncode == 1
    assert (
        f"error: another kseries rebase is running on {project.tree} (pid {winner.pid})"
        in loser.stderr
    )
    assert "Traceback" not in loser.stderr
    # one backup of the first run's tip, not two; the winner's branch stands as it made it
    assert attempts(project) == ["refs/kseries/attempts/demo-v2/1"]
    assert git(project.tree, "symbolic-ref", "HEAD").strip() == "refs/heads/demo-v2"
    assert git(project.tree, "status", "--porcelain") == ""
    assert not (project.tree / ".git/kseries/rebase.json").exists()


def test_a_branch_checked_out_in_another_worktree_is_refused(project: Project) -> None:
    Rebase(project.worktree(), project.series(), log=lambda _: None).start(
        remote="kvm-x86", branch="next"
    )
    git(project.tree, "checkout", "-q", "master")
    other = project.root / "other-worktree"
    git(project.tree, "worktree", "add", "-q", str(other), "demo-v2")
    project.upstream_commit(SOURCE + "line 41\n")
    before = project.snapshot()
    with pytest.raises(ToolkitError) as raised:
        Rebase(project.worktree(), project.series(), log=lambda _: None).start(
            remote="kvm-x86", branch="next", fetch=False
        )
    assert raised.value.message == f"demo-v2 is checked out in another worktree, {other}"
    assert project.snapshot() == before
    assert attempts(project) == []


def stop_on_conflict(project: Project) -> None:
    project.upstream_commit(replace_line(SOURCE, 10, "line 10 changed upstream"))
    with pytest.raises(ConflictError):
        Rebase(project.worktree(), project.series(), log=lambda _: None).start(
            remote="kvm-x86", branch="next"
        )


@pytest.mark.parametrize("content", ["", '{"branch": "demo-v2", "ba', "[1, 2]", "\x00\xff"])
def test_abort_works_with_a_cut_short_state_file(project: Project, content: str) -> None:
    before_head = git(project.tree, "symbolic-ref", "HEAD")
    stop_on_conflict(project)
    state = RebaseProgress.path(project.worktree())
    state.write_text(content)
    runner = Rebase(project.worktree(), project.series(), log=lambda _: None)
    with pytest.raises(ToolkitError) as raised:
        runner.resume()
    assert "the stopped rebase's state is unreadable" in raised.value.message
    assert "invoke rebase --abort" in raised.value.hint
    runner.abort()
    assert not (project.tree / ".git/rebase-apply").exists()
    assert not state.exists()
    assert state.with_name("rebase.json.unreadable").read_text() == content
    assert git(project.tree, "status", "--porcelain") == ""
    assert before_head == "refs/heads/master\n"


def test_cli_reports_a_cut_short_state_as_one_line(project: Project) -> None:
    stop_on_conflict(project)
    RebaseProgress.path(project.worktree()).write_text('{"branch": ')
    done = rebase(project, "--continue")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")
    assert rebase(project, "--abort").returncode == 0


def test_a_corrupt_branch_record_does_not_stop_the_next_run(project: Project) -> None:
    Rebase(project.worktree(), project.series(), log=lambda _: None).start(
        remote="kvm-x86", branch="next"
    )
    (project.tree / ".git/kseries/demo-v2.json").write_text("{not json")
    result = Rebase(project.worktree(), project.series(), log=lambda _: None).start(
        remote="kvm-x86", branch="next"
    )
    assert result.backup_ref == "refs/kseries/attempts/demo-v2/1"
