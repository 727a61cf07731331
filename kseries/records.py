"""What the stages leave in the tree's .git/kseries/ for the stages after them: the state of a
rebase stopped on a conflict, each finished branch's record (its base and commits), the check
stage's record of the gates each commit passed, and a pointer to the newest test-remote report
of each branch.

A module of its own so that send reads them without importing the rebase, check and test-box
stages (and jinja2, fabric, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kseries.core.files import write_atomic
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree

DIR = "kseries"


def rebase_state(tree: WorkTree) -> Path:
    """Present exactly while a rebase is stopped, until --continue or --abort."""
    return tree.git_path(f"{DIR}/rebase.json")


def branch_record(tree: WorkTree, branch: str) -> Path:
    return tree.git_path(f"{DIR}/{branch}.json")


def check_record(tree: WorkTree, branch: str) -> Path:
    """`invoke check`'s results for `branch`: per gate, the commits it built and whether each
    passed (written by the check stage, read by send for the cover letter)."""
    return tree.git_path(f"{DIR}/check/{branch}.json")


def report_pointer(tree: WorkTree, branch: str) -> Path:
    """Where test-remote says which report.json is the newest of `branch`, and of which commit."""
    return tree.git_path(f"{DIR}/test-remote/{branch}.json")


def read(path: Path, what: str, rerun: str) -> dict[str, Any] | None:
    """A record as a JSON object, None if there is none. A damaged one (a hand edit, a write
    cut short by an older toolkit) is an error naming the file and `rerun`, the command that
    writes it anew: guessing from half a record could mail what was never checked."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError(f"not a JSON object but {type(data).__name__}")
    except (ValueError, TypeError) as e:
        raise damaged(path, what, rerun, e) from e
    return data


def damaged(path: Path, what: str, rerun: str, error: Exception) -> ToolkitError:
    return ToolkitError(
        f"{path}: damaged {what} ({type(error).__name__}: {error})",
        f"delete it (rm {path}) and run `{rerun}` again, which writes it anew",
    )


def write(path: Path, data: dict[str, Any]) -> None:
    """Written atomically: a reader, or the next run after a kill, sees the old or the new."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def recorded_base(tree: WorkTree, branch: str) -> str | None:
    """The base the last finished rebase put `branch` on; None if none recorded it."""
    path = branch_record(tree, branch)
    data = read(path, "branch record", "invoke rebase")
    if data is None:
        return None
    try:
        base = data["base"]
        if not isinstance(base, str) or not base:
            raise TypeError(f"base is {base!r}")
    except (KeyError, TypeError) as e:
        raise damaged(path, "branch record", "invoke rebase", e) from e
    return base


def series_base(tree: WorkTree, branch: str, upstream: str) -> str:
    """The commit the series on `branch` sits on: the one its last rebase recorded, since the
    upstream ref may have been force-pushed since (kvm-x86/next is), which moves its
    merge-base with the branch further back; else, or if the branch was rebuilt by hand
    since, the merge-base with `upstream`."""
    recorded = recorded_base(tree, branch)
    if recorded and tree.try_git("merge-base", "--is-ancestor", recorded, branch)[0] == 0:
        return recorded
    return tree.git("merge-base", branch, upstream).strip()


def remember_test_report(
    tree: WorkTree, kernel: dict[str, Any], report: Path, local_qemu: list[str]
) -> None:
    """test-remote's pointer to `report` as the newest of the branch its kernel was built from
    (`kernel`: the report's "kernel", the build manifest's tree, branch, commit and dirty), and
    which of its boxes were local QEMU boxes (what the cover letter may call real hardware)."""
    write(
        report_pointer(tree, kernel["branch"]),
        {
            "branch": kernel["branch"],
            "commit": kernel["commit"],
            "dirty": kernel.get("dirty", False),
            "report": str(report.resolve()),
            "local_qemu": local_qemu,
        },
    )
