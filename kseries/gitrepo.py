"""A git work tree, and the handful of git questions every stage asks of it.

Plain `git` through the command door: every call here is one git command, and importing a git
library would cost more start-up time than the whole rebase's own overhead budget.
"""

from __future__ import annotations

import os
from pathlib import Path

from kseries.core.run import DEVNULL, run, start
from kseries.errors import ToolkitError

IN_PROGRESS = {
    "rebase-apply": "an am or rebase",
    "rebase-merge": "a rebase",
    "MERGE_HEAD": "a merge",
    "CHERRY_PICK_HEAD": "a cherry-pick",
    "REVERT_HEAD": "a revert",
}


class WorkTree:
    """A non-bare git repository the toolkit works in."""

    def __init__(self, path: Path) -> None:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ToolkitError(
                f"tree {path} does not exist",
                "pass --tree DIR or set tree.path in configs/local.toml",
            )
        self.path = path
        status, out, _ = self.try_git(
            "rev-parse", "--is-bare-repository", "--show-toplevel", "--absolute-git-dir"
        )
        if status != 0:
            raise ToolkitError(
                f"tree {path} is not a git repository", "point --tree at a kernel git checkout"
            )
        bare, *rest = out.split("\n")
        if bare == "true" or len(rest) < 2:
            raise ToolkitError(f"tree {path} is a bare repository", "use a checkout")
        self.path = Path(rest[0])
        self.git_dir = Path(rest[1])

    def git(self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
        """Run git here and return stdout; a failure becomes a ToolkitError with git's words."""
        status, out, err = self.try_git(*args, env=env, stdin=stdin)
        if status != 0:
            tail = "; ".join(err.strip().splitlines()[-3:]) or f"exit {status}"
            raise ToolkitError(
                f"{self.path}: git {' '.join(args[:2])} failed: {tail}",
                "run the same git command by hand to see the whole output",
            )
        return out

    def try_git(
        self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
    ) -> tuple[int, str, str]:
        """Run git here; return (status, stdout, stderr) without raising."""
        result = run(
            ["git", *args],
            input=stdin,
            cwd=self.path,
            env={**os.environ, **env} if env else None,
            check=False,
        )
        return result.status, result.stdout, result.stderr

    def git_path(self, name: str) -> Path:
        """A path inside this work tree's git directory (its own, for a linked worktree)."""
        return self.git_dir / name

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

    def clean_check(self) -> CleanCheck:
        """Start asking whether the tree has uncommitted changes, in the background: on a
        kernel tree that is one lstat() of 90k files, the slowest question a rebase asks, and
        the caller has templates to render meanwhile. Its `require()` refuses a tree with
        tracked changes or a half-done am, rebase or merge."""
        return CleanCheck(self)

    def remotes(self) -> list[str]:
        return self.git("remote").split()


class CleanCheck:
    """`git diff --quiet HEAD`, running; `require()` waits for it and refuses a dirty tree."""

    def __init__(self, tree: WorkTree) -> None:
        self.tree = tree
        self.diff = start(
            ["git", "diff", "--quiet", "HEAD", "--"], cwd=tree.path, stdout=DEVNULL, stderr=DEVNULL
        )

    def require(self) -> None:
        what = self.tree.operation_in_progress()
        if what:
            self.cancel()
            raise ToolkitError(
                f"{self.tree.path} is in the middle of {what}",
                "finish it or abort it (git am --abort, git rebase --abort, ...)",
            )
        if self.diff.wait() != 0:
            raise ToolkitError(
                f"{self.tree.path} has uncommitted changes",
                "commit or stash them first (git stash)",
            )

    def cancel(self) -> None:
        """Stop it (read-only, so safe to kill) when the caller fails first."""
        self.diff.kill()
        self.diff.wait()
