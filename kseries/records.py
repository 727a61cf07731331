"""What the rebase stage leaves in the tree's .git/kseries/ for the stages after it: the state
of a run stopped on a conflict, and each finished branch's record (its base and commits).

A module of its own so that send reads them without importing the rebase stage and jinja2.
"""

from __future__ import annotations

import json
from pathlib import Path

from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree

DIR = "kseries"


def rebase_state(tree: WorkTree) -> Path:
    """Present exactly while a rebase is stopped, until --continue or --abort."""
    return tree.git_path(f"{DIR}/rebase.json")


def branch_record(tree: WorkTree, branch: str) -> Path:
    return tree.git_path(f"{DIR}/{branch}.json")


def recorded_base(tree: WorkTree, branch: str) -> str | None:
    """The base the last finished rebase put `branch` on; None if none recorded it.

    A damaged record (a write cut short, a hand edit) is an error naming the file: guessing
    a base could mail commits that are not the series'."""
    path = branch_record(tree, branch)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        base = json.loads(text)["base"]
        if not isinstance(base, str) or not base:
            raise TypeError(f"base is {base!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ToolkitError(
            f"{path}: damaged branch record ({type(e).__name__}: {e})",
            f"delete it (rm {path}) and run `invoke rebase` again, which writes it anew",
        ) from e
    return base
