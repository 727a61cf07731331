"""What a user can get wrong on the command line, or in the files around it, ends in one
`error:` line and a hint, exit status 1, never a traceback, and changes nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kseries.rebase import Rebase
from tests.conftest import Project, git, invoke, one_error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["test-remote", "--duration", "abc"], "--duration abc: not a number"),
        (["test-remote", "--cycles", "many"], "--cycles many: not a whole number"),
        (["test-remote", "--cycles", "-3"], "--cycles -3: must be at least 0"),
        (["build", "--jobs", "two"], "--jobs two: not a whole number"),
        (["testbox.console", "--lines", "ten"], "--lines ten: not a whole number"),
        (["send-series", "--dry-run", "--send"], "--dry-run and --send contradict each other"),
    ],
)
def test_option_values_that_do_not_parse(project: Project, args: list[str], message: str) -> None:
    one_error(invoke(project, *args), message)


@pytest.mark.parametrize("task", ["changelog", "test-remote", "build"])
def test_out_pointing_at_a_file(project: Project, tmp_path: Path, task: str) -> None:
    target = tmp_path / "a-file"
    target.write_text("mine\n")
    extra = ["--tree", str(project.tree)] if task == "build" else []
    one_error(
        invoke(project, task, "--out", str(target), *extra),
        f"--out {target} is a file, not a directory",
    )
    assert target.read_text() == "mine\n"


def need_mounts() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("read-only mounts need root and unshare (util-linux)")


def test_an_unwritable_out(project: Project, tmp_path: Path) -> None:
    need_mounts()
    out = tmp_path / "ro"
    out.mkdir()
    done = invoke(project, "changelog", "--out", str(out), read_only=out)
    one_error(done, f"--out {out} is not writable")
    assert list(out.iterdir()) == []


def test_a_read_only_tree(project: Project) -> None:
    need_mounts()
    before = project.snapshot()
    done = invoke(project, "rebase", "--tree", str(project.tree), read_only=project.tree)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")
    assert "Read-only file system" in done.stderr
    assert project.snapshot() == before


def test_read_only_patches(project: Project) -> None:
    need_mounts()
    Rebase(project.worktree(), project.series(), log=lambda _: None).start(
        remote="kvm-x86", branch="next"
    )
    patches = project.root / "patches"
    (project.tree / "file.c").write_text((project.tree / "file.c").read_text() + "line 41\n")
    git(project.tree, "commit", "-qam", "amend the last patch by hand", "--amend", "--no-edit")
    before = {p.name: p.read_bytes() for p in patches.iterdir()}
    done = invoke(project, "export", "--tree", str(project.tree), read_only=patches)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "Read-only file system" in done.stderr
    assert {p.name: p.read_bytes() for p in patches.iterdir()} == before
