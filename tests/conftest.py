"""Scratch projects and real git repositories for the pipeline's tests."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from kseries.config import Config
from kseries.gitrepo import WorkTree
from kseries.paths import PROJECT
from kseries.series import Series, load

ENV = {
    "GIT_AUTHOR_NAME": "Upstream Dev",
    "GIT_AUTHOR_EMAIL": "dev@example.org",
    "GIT_COMMITTER_NAME": "Upstream Dev",
    "GIT_COMMITTER_EMAIL": "dev@example.org",
}

SOURCE = "".join(f"line {n}\n" for n in range(1, 41))

SERIES_TOML = """
[series]
name = "demo"
version = 2
submitter = "sub"
cover_template = "cover.j2"

[base]
remote = "kvm-x86"
url = "https://example.org/linux.git"
branch = "next"

[people.author]
name = "Ann Author"
email = "ann@example.org"

[people.sub]
name = "Sam Submitter"
email = "sam@example.org"

[people.maint]
name = "Max Maintainer"
email = "max@example.org"

[[patch]]
diff = "0001.diff"
template = "0001.j2"
author = "author"
date = "Fri, 9 Aug 2024 20:51:58 +0000"
co_developers = ["sub"]
suggested_by = ["maint"]
links = ["https://lore.kernel.org/all/abc@example.org"]

[[patch]]
diff = "0002.diff"
template = "0002.j2"
author = "sub"
"""


def git(cwd: Path, *args: str) -> str:
    env = {**ENV, "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout


@dataclass
class Project:
    """A scratch kseries project: configs/, templates/, patches/, plus a tree and its upstream."""

    root: Path
    upstream: Path
    tree: Path

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    def series(self) -> Series:
        return load(Config.load(self.configs))

    def worktree(self) -> WorkTree:
        return WorkTree(self.tree)

    def upstream_commit(self, text: str, message: str = "upstream change") -> str:
        """Advance the remote's next branch with a new file.c content."""
        scratch = self.root / "upstream-work"
        if not scratch.exists():
            git(self.root, "clone", "-q", "-b", "next", str(self.upstream), str(scratch))
        git(scratch, "pull", "-q", "--ff-only")
        (scratch / "file.c").write_text(text)
        git(scratch, "commit", "-qam", message)
        git(scratch, "push", "-q", "origin", "next")
        return git(scratch, "rev-parse", "HEAD").strip()

    def snapshot(self) -> tuple[str, ...]:
        """Everything a run must leave as it found when it refuses or aborts."""

        def run(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=self.tree, capture_output=True, text=True
            ).stdout

        return (
            run("for-each-ref", "--format=%(refname) %(objectname)"),
            run("symbolic-ref", "-q", "HEAD"),
            run("status", "--porcelain"),
            run("config", "--get-regexp", r"^branch\."),
        )


INVOKE = str(PROJECT / ".venv/bin/invoke")


def invoke(
    project: Project | None, *args: str, read_only: Path | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """A real `invoke` process, stdin closed, run in `cwd`; with `read_only`, that directory is
    mounted read-only for it alone (a private mount namespace: unshare -m, as root here)."""
    env = {**os.environ}
    if project is not None:
        env["KSERIES_CONFIG_DIR"] = str(project.configs)
    command = [INVOKE, "-r", str(PROJECT), *args]
    if read_only is not None:
        ro = shlex.quote(str(read_only))
        command = [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} {ro} && exec "
            + shlex.join(command),
        ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def one_error(done: subprocess.CompletedProcess[str], message: str, hint: str = "") -> None:
    """Exit status 1, no traceback: the line `error: message`, then one starting `hint: hint`."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == f"error: {message}", lines
    assert lines[1].startswith(f"hint: {hint}"), lines


def make_diff(base_text: str, new_text: str, workdir: Path) -> str:
    """A real `git diff` of file.c from base_text to new_text."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    git(workdir, "init", "-q")
    (workdir / "file.c").write_text(base_text)
    git(workdir, "add", "file.c")
    git(workdir, "commit", "-qm", "base")
    (workdir / "file.c").write_text(new_text)
    return git(workdir, "diff")


def replace_line(text: str, number: int, new: str) -> str:
    lines = text.splitlines(keepends=True)
    lines[number - 1] = new + "\n"
    return "".join(lines)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    root = tmp_path / "project"
    for sub in ("configs", "templates", "patches"):
        (root / sub).mkdir(parents=True)
    (root / "configs" / "series.toml").write_text(SERIES_TOML)
    (root / "templates" / "0001.j2").write_text(
        textwrap.dedent("""\
        demo: Change line 10

        Change line 10, so that {{ patch.author.name }}'s fix is in.
        """)
    )
    (root / "templates" / "0002.j2").write_text("demo: Change line 30\n\nAnd line 30 too.\n")
    (root / "templates" / "cover.j2").write_text(
        "demo: The cover\n\nTwo patches:\n{% for s in subjects %}- {{ s }}\n{% endfor %}"
    )
    seed = tmp_path / "seed"
    seed.mkdir()
    git(seed, "init", "-q", "-b", "next")
    (seed / "file.c").write_text(SOURCE)
    git(seed, "add", "file.c")
    git(seed, "commit", "-qm", "base")
    upstream = tmp_path / "upstream.git"
    git(tmp_path, "clone", "-q", "--bare", str(seed), str(upstream))
    tree = tmp_path / "linux"
    git(tmp_path, "clone", "-q", "-o", "kvm-x86", str(upstream), str(tree))
    git(tree, "checkout", "-q", "-b", "master")
    # The series was developed in this tree, so the blobs its diffs name are here (as in real
    # life), which is what lets `git am -3` merge three-way.
    git(tree, "checkout", "-q", "-b", "scratch")
    step1 = replace_line(SOURCE, 10, "line 10 fixed")
    step2 = replace_line(step1, 30, "line 30 fixed")
    for number, text in ((1, step1), (2, step2)):
        (tree / "file.c").write_text(text)
        git(tree, "commit", "-qam", f"step {number}")
        (root / "patches" / f"000{number}.diff").write_text(git(tree, "show", "--format=", "HEAD"))
    git(tree, "checkout", "-q", "master")
    git(tree, "branch", "-qD", "scratch")
    monkeypatch.setenv("KSERIES_CONFIG_DIR", str(root / "configs"))
    return Project(root, upstream, tree)


@pytest.fixture(scope="session")
def series_clone() -> Path:
    """The project's series rebased by the rebase stage onto kvm-x86/next, in a clone of the
    embedded 7.2 tree kept under ~/.cache/kseries/ci-series (its checkout and build
    directories make later runs incremental; a missing one is made afresh)."""
    from kseries.paths import cache_dir
    from kseries.rebase import Rebase
    from kseries.tree import scratch_clone

    clone = cache_dir() / "ci-series" / "default-tree" / "linux"
    if not (clone / ".git").exists():
        shutil.rmtree(clone, ignore_errors=True)
        clone.parent.mkdir(parents=True, exist_ok=True)
        scratch_clone(clone)
    tree = WorkTree(clone)
    tree.git("checkout", "-q", "-f", "master")  # whatever a killed run left checked out
    Rebase(tree, load(Config.load()), log=lambda _: None).start(remote="kvm-x86", branch="next")
    return clone
