"""Put the series on a fresh, versioned branch at the fetched base, with `git am -3`.

A run is a small state machine kept in .git/kseries/rebase.json: start, then either done,
or stopped on a conflict until `--continue` or `--abort`. The state records how the tree
was before the run, so `--abort` restores branch and HEAD exactly, and a failure that is not
a conflict restores them by itself.
"""

from __future__ import annotations

import email.policy
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import formataddr, formatdate
from pathlib import Path

from kseries import records, trailers
from kseries.changelog import Changelog, Message
from kseries.core.files import try_exclusive, write_atomic
from kseries.errors import ToolkitError
from kseries.gitrepo import CleanCheck, WorkTree
from kseries.series import Series, ident

STATE_DIR = records.DIR
ATTEMPTS = "refs/kseries/attempts"
CONFLICT_RE = re.compile(r"^error: patch failed: (?P<file>\S+):(?P<line>\d+)$", re.M)

Log = Callable[[str], None]


@dataclass
class RebaseProgress:
    """How the tree was before the run, and what the run has changed so far."""

    branch: str
    base: str
    original_head: str
    old_tip: str | None
    old_base: str | None
    backup_ref: str | None
    started: float
    patches: int

    @classmethod
    def path(cls, tree: WorkTree) -> Path:
        return records.rebase_state(tree)

    @classmethod
    def load(cls, tree: WorkTree) -> RebaseProgress | None:
        """The stopped run's state; None when no run is stopped. An unreadable file (cut short
        by a full disk, edited by hand) is an error that points at --abort, never a traceback."""
        path = cls.path(tree)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise UnreadableState(path, e) from e

    def save(self, tree: WorkTree) -> None:
        write_atomic(self.path(tree), json.dumps(asdict(self), indent=2) + "\n")

    def clear(self, tree: WorkTree) -> None:
        self.path(tree).unlink(missing_ok=True)


class UnreadableState(ToolkitError):
    def __init__(self, path: Path, problem: Exception) -> None:
        super().__init__(
            f"{path}: the stopped rebase's state is unreadable ({problem})",
            f"invoke rebase --abort (it undoes the am; the previous tip is kept under {ATTEMPTS}/)",
        )
        self.path = path


@dataclass
class Rebased:
    """What a finished rebase made; also written as .git/kseries/<branch>.json."""

    branch: str
    base: str
    base_describe: str
    commits: list[tuple[str, str]]
    seconds: float
    backup_ref: str | None = None
    range_diff: str = ""


class ConflictError(ToolkitError):
    """`git am -3` stopped on a patch; the state is kept for --continue or --abort."""

    def __init__(
        self,
        tree: WorkTree,
        patch: str,
        files: list[str],
        hunks: list[str],
        no_merge_base: str = "",
    ) -> None:
        lines = [f"{patch} does not apply on the base in {tree.path}"]
        lines += [f"  conflict: {hunk}" for hunk in hunks] or [f"  file: {f}" for f in files]
        lines.append("next:")
        if no_merge_base:
            lines.append(
                f"  no three-way merge was possible: git -C {tree.path} apply --reject "
                f"{no_merge_base}, then fix each .rej hunk by hand"
            )
        else:
            lines.append("  edit the files to resolve the conflict markers")
        lines += [
            f"  git -C {tree.path} add {' '.join(files)}",
            "  invoke rebase --continue      (or: invoke rebase --abort to undo the whole run)",
        ]
        super().__init__("\n".join(lines))
        self.files = files
        self.hunks = hunks


def mbox(series: Series, messages: list[Message]) -> str:
    """One mbox holding every patch, each with its real author, date and rendered message."""
    mails = []
    for patch, message in zip(series.patches, messages, strict=True):
        mail = EmailMessage(policy=email.policy.default.clone(max_line_length=0))
        mail["From"] = formataddr((patch.author.name, patch.author.email))
        mail["Date"] = patch.date or formatdate(localtime=True)
        mail["Subject"] = message.subject
        body = f"{message.body}\n\n" + "\n".join(str(t) for t in message.trailers)
        mail.set_content(f"{body}\n---\n{patch.diff.read_text()}", cte="8bit")
        mails.append(
            "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
            + mail.as_string()
        )
    return "\n".join(mails)


class Rebase:
    """One series onto one tree: start, continue or abort a run."""

    def __init__(self, tree: WorkTree, series: Series, log: Log = print) -> None:
        self.tree = tree
        self.series = series
        self.log = log
        self.env = series.committer_env

    # -- start -----------------------------------------------------------------------------

    def start(
        self, *, remote: str, branch: str, fetch: bool = True, clean: CleanCheck | None = None
    ) -> Rebased:
        """A fresh run. `clean`: the tree's clean check, if the caller started it already (a
        failure before it is answered cancels it)."""
        started = time.monotonic()
        clean = clean or self.tree.clean_check()
        try:
            with self._exclusive():
                return self._start(remote, branch, fetch, clean, started)
        except BaseException:
            clean.cancel()
            raise

    def _start(
        self, remote: str, branch: str, fetch: bool, clean: CleanCheck, started: float
    ) -> Rebased:
        changelog = Changelog(self.series)
        messages = changelog.messages()  # renders and checks every trailer before git runs
        cover = changelog.cover_letter()
        if RebaseProgress.load(self.tree):
            raise ToolkitError(
                f"{self.tree.path}: a kseries rebase is already in progress",
                "invoke rebase --continue, or invoke rebase --abort",
            )
        clean.require()
        base = (
            self._fetch(remote, branch)
            if fetch
            else self.tree.rev(f"refs/remotes/{remote}/{branch}")
        )
        if base is None:
            self._require_remote(remote)
            raise ToolkitError(
                f"{self.tree.path}: refs/remotes/{remote}/{branch} does not exist",
                f"run without --no-fetch, or check that {remote} has '{branch}'",
            )
        target = self.series.branch
        self._require_not_checked_out_elsewhere(target)
        old_tip = self.tree.rev(f"refs/heads/{target}")
        state = RebaseProgress(
            branch=target,
            base=base,
            original_head=self.tree.head(),
            old_tip=old_tip,
            old_base=self._recorded_base(target) if old_tip else None,
            backup_ref=None,
            started=time.time(),
            patches=len(messages),
        )
        mbox_path = self.tree.git_path(f"{STATE_DIR}/series.mbox")
        write_atomic(mbox_path, mbox(self.series, messages))
        state.save(self.tree)
        try:
            if old_tip:
                state.backup_ref = self._backup(target, old_tip)
                state.save(self.tree)
            self.tree.git("checkout", "--quiet", "-B", target, base)
            self.log(f"applying {len(messages)} patches on {base[:12]} as {target}")
            self._am("-3", "--keep", "--no-scissors", str(mbox_path))
        except ConflictError:
            raise
        except BaseException:
            self.abort()
            raise
        return self._finish(state, cover, started)

    # -- continue and abort ----------------------------------------------------------------

    def resume(self) -> Rebased:
        started = time.monotonic()
        with self._exclusive():
            state = self._state()
            if self.tree.git_path("rebase-apply").exists():
                self._am("--continue")
            return self._finish(state, Changelog(self.series).cover_letter(), started)

    def abort(self) -> None:
        """Put branch, HEAD and work tree back exactly as they were before the run."""
        with self._exclusive():
            try:
                state = self._state()
            except UnreadableState as e:
                self._salvage(e.path)
                return
            self._abort(state)

    def _abort(self, state: RebaseProgress) -> None:
        if self.tree.git_path("rebase-apply").exists():
            self.tree.git("am", "--abort")
        # The run began on a clean tree, so whatever the merge left behind is ours to drop.
        self.tree.git("reset", "--hard", "--quiet")
        if state.old_tip:  # detach first, so moving the branch back leaves the work tree alone
            self.tree.git("checkout", "--quiet", "--detach")
            self.tree.git("update-ref", f"refs/heads/{state.branch}", state.old_tip)
        if state.original_head.startswith("refs/heads/"):
            self.tree.git("checkout", "--quiet", state.original_head.removeprefix("refs/heads/"))
        else:
            self.tree.git("checkout", "--quiet", "--detach", state.original_head)
        if not state.old_tip and self.tree.rev(f"refs/heads/{state.branch}"):
            self.tree.git("branch", "--quiet", "-D", state.branch)
        if state.backup_ref:
            self.tree.git("update-ref", "-d", state.backup_ref)
        state.clear(self.tree)
        self.log(f"aborted: {self.tree.path} is back on {state.original_head}")

    def _salvage(self, path: Path) -> None:
        """--abort without a readable state: undo the am, which is all that can be known to be
        this run's, and say where the previous tip is; the unreadable file is kept aside."""
        if self.tree.git_path("rebase-apply").exists():
            self.tree.git("am", "--abort")
        aside = path.with_name(f"{path.name}.unreadable")
        path.replace(aside)
        attempts = self.tree.git(
            "for-each-ref", "--sort=-creatordate", "--format=%(refname)", f"{ATTEMPTS}/"
        ).split()
        self.log(
            f"aborted the am; the run's state was unreadable (kept as {aside}), so the branch "
            f"and HEAD were left where the am had them (HEAD: {self.tree.head()})"
            + (f"; the previous tip is {attempts[0]}" if attempts else "")
        )

    # -- helpers ---------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One kseries rebase per tree at a time; the other is refused, never queued: it must
        not back up, move or "restore" what the running one is doing."""
        lock = self.tree.git_path(f"{STATE_DIR}/rebase.lock")
        with try_exclusive(lock) as mine:
            if not mine:
                raise ToolkitError(
                    f"another kseries rebase is running on {self.tree.path} (pid {_holder(lock)})",
                    "wait for it to finish; this run changed nothing",
                )
            lock.write_text(f"{os.getpid()}\n")
            try:
                yield
            finally:
                lock.write_text("")

    def _require_not_checked_out_elsewhere(self, branch: str) -> None:
        """git refuses `checkout -B` of a branch another worktree has checked out, but only
        after the backup; refuse before anything is touched, naming that worktree."""
        ref = f"branch refs/heads/{branch}"
        for block in self.tree.git("worktree", "list", "--porcelain").split("\n\n"):
            lines = block.splitlines()
            if ref in lines and lines[0] != f"worktree {self.tree.path}":
                other = lines[0].removeprefix("worktree ")
                raise ToolkitError(
                    f"{branch} is checked out in another worktree, {other}",
                    f"check out something else there (git -C {other} switch --detach), "
                    "then run the rebase again",
                )

    def _fetch(self, remote: str, branch: str) -> str | None:
        """Fetch the base into its remote-tracking ref; return the commit it names."""
        tracking = f"refs/remotes/{remote}/{branch}"
        self.log(f"fetching {remote} {branch}")
        status, _, err = self.tree.try_git(
            "fetch", "--no-tags", "--quiet", remote, f"+refs/heads/{branch}:{tracking}"
        )
        if status != 0:
            self._require_remote(remote)
            raise ToolkitError(
                f"{self.tree.path}: git fetch {remote} {branch} failed: "
                f"{'; '.join(err.strip().splitlines()[-2:])}",
                "check the remote's URL and your network, or use --no-fetch",
            )
        return self.tree.rev(tracking)

    def _require_remote(self, remote: str) -> None:
        """Asked only after a failure, so the common path spends no git call on it."""
        if remote not in self.tree.remotes():
            raise ToolkitError(
                f"{self.tree.path}: no remote named '{remote}'",
                f"git -C {self.tree.path} remote add {remote} {self.series.base.url}",
            )

    def _state(self) -> RebaseProgress:
        state = RebaseProgress.load(self.tree)
        if state is None:
            raise ToolkitError(
                f"{self.tree.path}: no kseries rebase in progress", "start one with: invoke rebase"
            )
        return state

    def _am(self, *args: str) -> None:
        status, out, err = self.tree.try_git("am", *args, env=self.env)
        if status == 0:
            return
        if not self.tree.git_path("rebase-apply").exists():
            raise ToolkitError(
                f"{self.tree.path}: git am failed: {err.strip() or out.strip()}",
                "see git am's message above",
            )
        number = int(self.tree.git_path("rebase-apply/next").read_text())
        patch = self.series.patches[number - 1]
        unmerged = self.tree.git("diff", "--name-only", "--diff-filter=U").split()
        if unmerged:  # a three-way merge left conflict markers
            hunks = [
                f"{name}:{n}"
                for name in unmerged
                for n, line in enumerate(self._lines(name), 1)
                if line.startswith("<<<<<<<")
            ]
            raise ConflictError(self.tree, patch.label, unmerged, hunks)
        # No three-way merge was possible (the patch's blobs are not in this repository):
        # ask git apply which hunks fail, so the report still names them.
        current = str(self.tree.git_path("rebase-apply/patch"))
        _, _, check = self.tree.try_git("apply", "--check", current)
        hunks = [f"{m['file']}:{m['line']}" for m in CONFLICT_RE.finditer(check)]
        if not hunks:  # `--continue` with the conflicts still unresolved, or another am error
            raise ToolkitError(
                f"{self.tree.path}: git am: {(err or out).strip().splitlines()[0]}",
                f"git -C {self.tree.path} add the resolved files, then --continue",
            )
        files = sorted({hunk.rsplit(":", 1)[0] for hunk in hunks})
        raise ConflictError(self.tree, patch.label, files, hunks, no_merge_base=current)

    def _lines(self, name: str) -> list[str]:
        return (self.tree.path / name).read_text(errors="replace").splitlines()

    def _backup(self, branch: str, tip: str) -> str:
        existing = self.tree.git("for-each-ref", "--format=%(refname)", f"{ATTEMPTS}/{branch}/")
        numbers = [
            int(r.rsplit("/", 1)[1]) for r in existing.split() if r.rsplit("/", 1)[1].isdigit()
        ]
        ref = f"{ATTEMPTS}/{branch}/{max(numbers, default=0) + 1}"
        self.tree.git("update-ref", ref, tip)
        return ref

    def _recorded_base(self, branch: str) -> str | None:
        """The base the branch's last run recorded; None when unknown (no record, or one that
        does not parse: the range-diff then falls back to the merge base, and this run
        writes the record anew)."""
        try:
            return records.recorded_base(self.tree, branch)
        except (OSError, ToolkitError):
            return None

    def _finish(self, state: RebaseProgress, cover: Message, started: float) -> Rebased:
        """Check what git made, describe the branch, compare with the last attempt."""
        log = self.tree.git(
            "log",
            "--reverse",
            # git's own trailer parser, in the same call: no process per commit
            "--format=%H%x00%an%x00%ae%x00%s%x00%(trailers:only,unfold)%x01",
            f"{state.base}..{state.branch}",
        )
        entries = [e.strip("\n").split("\0") for e in log.split("\x01") if e.strip()]
        if len(entries) != state.patches:
            raise ToolkitError(
                f"{self.tree.path}: {state.branch} has {len(entries)} commits on the base, "
                f"expected {state.patches}",
                "a patch was skipped or added by hand: invoke rebase --abort and start over",
            )
        for (sha, name, address, _, block), patch in zip(entries, self.series.patches, strict=True):
            trailers.check(
                [trailers.Trailer.parse(line) for line in block.splitlines() if line.strip()],
                author=ident(name, address),  # quoted as a trailer quotes it
                submitter=self.series.submitter.ident,
                where=f"{state.branch} {sha[:12]} ({patch.label})",
            )
        self.tree.git(
            "config", f"branch.{state.branch}.description", f"{cover.subject}\n\n{cover.body}\n"
        )
        range_diff = ""
        if state.old_tip:
            old_base = (
                state.old_base or self.tree.git("merge-base", state.old_tip, state.base).strip()
            )
            range_diff = self.tree.git(
                "range-diff",
                "--no-color",
                f"{old_base}..{state.old_tip}",
                f"{state.base}..{state.branch}",
            )
        result = Rebased(
            branch=state.branch,
            base=state.base,
            base_describe=self.tree.git("describe", "--tags", "--always", state.base).strip(),
            commits=[(sha, subject) for sha, _, _, subject, _ in entries],
            seconds=round(time.monotonic() - started, 2),
            backup_ref=state.backup_ref,
            range_diff=range_diff,
        )
        write_atomic(
            records.branch_record(self.tree, state.branch),
            json.dumps(asdict(result), indent=2) + "\n",
        )
        state.clear(self.tree)
        return result


def _holder(lock: Path) -> str:
    """The pid the lock's holder wrote; it writes it right after taking the lock."""
    for _ in range(20):
        pid = lock.read_text().strip()
        if pid:
            return pid
        time.sleep(0.025)
    return "unknown"


def summary(result: Rebased) -> str:
    """The rebase's summary: base, each new commit, where the last attempt went, time."""
    lines = [
        f"{result.branch}: {len(result.commits)} commits on {result.base[:12]} "
        f"({result.base_describe}) in {result.seconds:.1f} s"
    ]
    total = len(result.commits)
    lines += [
        f"  {n}/{total} {sha[:12]} {subject}"
        for n, (sha, subject) in enumerate(result.commits, start=1)
    ]
    if result.backup_ref:
        lines.append(f"  previous attempt kept as {result.backup_ref}; range-diff:")
    return "\n".join(lines)
