"""A git work tree, and the handful of git questions every stage asks of it."""

from __future__ import annotations

import os
from pathlib import Path

import git

from kseries.errors import ToolkitError

IN_PROGRESS = {
    "rebase-apply": "an am or rebase",
    "rebase-merge": "a rebase",
    "MERGE_HEAD": "a merge",
    "CHERRY_PICK_HEAD": "a cherry-pick",
    "REVERT_HEAD": "a revert",
}


class WorkTree:
    """A non-bare git repository the toolkit works in, via GitPython."""

    def __init__(self, path: Path) -> None:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ToolkitError(
                f"tree {path} does not exist",
                "pass --tree DIR or set tree.path in configs/local.toml",
            )
        try:
            self.repo = git.Repo(path)
        except git.InvalidGitRepositoryError as e:
            raise ToolkitError(
                f"tree {path} is not a git repository", "point --tree at a kernel git checkout"
            ) from e
        if self.repo.bare:
            raise ToolkitError(f"tree {path} is a bare repository", "use a checkout")
        self.path = Path(self.repo.working_tree_dir or path)

    def git(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Run git here and return stdout; a failure becomes a ToolkitError with git's words."""
        status, out, err = self.try_git(*args, env=env)
        if status != 0:
            tail = "; ".join(err.strip().splitlines()[-3:]) or f"exit {status}"
            raise ToolkitError(
                f"{self.path}: git {' '.join(args[:2])} failed: {tail}",
                "run the same git command by hand to see the whole output",
            )
        return out

    def try_git(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """Run git here; return (status, stdout, stderr) without raising."""
        return self.repo.git.execute(
            ["git", *args],
            with_extended_output=True,
            with_exceptions=False,
            env={**os.environ, **(env or {})},
            strip_newline_in_stdout=False,
        )

    def git_path(self, name: str) -> Path:
        """A path inside .git (git rev-parse --git-path), right for linked worktrees too."""
        return self.path / self.git("rev-parse", "--git-path", name).strip()

    def rev(self, ref: str) -> str | None:
        """The commit `ref` names, or None if it names nothing."""
        status, out, _ = self.try_git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}")
        return out.strip() if status == 0 else None

    def head(self) -> str:
        """What HEAD is: a full branch ref when on a branch, else the commit sha."""
        status, out, _ = self.try_git("symbolic-ref", "-q", "HEAD")
        return out.strip() if status == 0 else self.git("rev-parse", "HEAD").strip()

    def operation_in_progress(self) -> str | None:
        for name, what in IN_PROGRESS.items():
            if self.git_path(name).exists():
                return what
        return None

    def require_clean(self) -> None:
        """Refuse a tree with tracked changes or a half-done am, rebase or merge."""
        what = self.operation_in_progress()
        if what:
            raise ToolkitError(
                f"{self.path} is in the middle of {what}",
                "finish it or abort it (git am --abort, git rebase --abort, ...)",
            )
        if self.repo.is_dirty(index=True, working_tree=True, untracked_files=False):
            raise ToolkitError(
                f"{self.path} has uncommitted changes", "commit or stash them first (git stash)"
            )

    def remotes(self) -> list[str]:
        return [r.name for r in self.repo.remotes]
