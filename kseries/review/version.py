"""`invoke new-version`: start vN+1 of a sent series.

It bumps [series] version in series.toml (the sent record stays), rebases the series as
`invoke rebase` does onto the fresh base, and compares the new branch with what was sent:
`git range-diff` against the `sent/` tag, and the patches whose diff or message changed,
which the cover letter's "Changes since vN" must name before `send-series` lets it go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kseries import series as series_stage
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.rebase import ConflictError, Rebase, Rebased
from kseries.review import sent as sent_stage
from kseries.review.data import Edit, Sent


@dataclass(frozen=True)
class NewVersion:
    sent: Sent
    rebased: Rebased
    range_diff: str
    changed: dict[int, str]
    changes_template: str
    template_exists: bool


def new_version(
    config: Config,
    tree: WorkTree,
    *,
    remote: str = "",
    branch: str = "",
    fetch: bool = True,
    log: Callable[[str], None] = print,
) -> NewVersion:
    """Bump the version, rebase, and compare with the sent version. A failure other than a
    conflict (which stops resumable, as `invoke rebase` does) puts series.toml back."""
    series = series_stage.load(config)
    sent = sent_stage.recorded(series)
    if sent is None:
        raise ToolkitError(
            f"{series.source}: v{series.version} was never sent (configs/review.toml has no "
            f"[[sent]] version = {series.version})",
            "send it first (invoke send-series --send), or keep working on it with invoke rebase",
        )
    edit = Edit(config)
    edit.set_version(series.version + 1)
    edit.write(series_stage.load)  # refused, and put back, if the series no longer loads
    log(f"{series.source.name}: version {series.version} -> {series.version + 1}")
    fresh = series_stage.load(config.reload())
    try:
        result = Rebase(tree, fresh, log=log).start(
            remote=remote or fresh.base.remote, branch=branch or fresh.base.branch, fetch=fetch
        )
    except ConflictError:
        raise  # stopped on a conflict: resumable with `invoke rebase --continue`
    except BaseException:
        edit.undo()
        raise
    template = f"changes-since-v{sent.version}.j2"
    return NewVersion(
        sent=sent,
        rebased=result,
        range_diff=range_diff(tree, sent, result.base, fresh.branch),
        changed=sent_stage.changed(
            sent, [fp for _, fp in sent_stage.branch_fingerprints(tree, result.base, fresh.branch)]
        ),
        changes_template=str(fresh.templates_dir / template),
        template_exists=(fresh.templates_dir / template).is_file(),
    )


def range_diff(tree: WorkTree, sent: Sent, base: str, branch: str) -> str:
    """`git range-diff` of the sent version (its tag, else its recorded tip) against `branch`."""
    old = sent.tag if tree.rev(f"refs/tags/{sent.tag}") else sent.tip
    if tree.rev(old) is None:
        return f"(no range-diff: this tree has neither {sent.tag} nor {sent.tip[:12]})"
    return tree.git("range-diff", "--no-color", f"{sent.base}..{old}", f"{base}..{branch}")


def summary(done: NewVersion) -> str:
    sent = done.sent
    lines = [
        f"started v{sent.version + 1}: {done.rebased.branch}, {len(done.rebased.commits)} "
        f"commits on {done.rebased.base[:12]} ({done.rebased.base_describe})",
        # the sent range against the new one: `sent/<v2>...<v3>` with each side's own base
        f"git range-diff {sent.base[:12]}..{sent.tag} {done.rebased.base[:12]}.."
        f"{done.rebased.branch}:",
    ]
    tail = [
        f"changed since v{sent.version}: {sent_stage.describe_changed(done.changed) or 'nothing'}"
    ]
    if done.changed and not done.template_exists:
        tail.append(
            f"next: write {done.changes_template} ('Changes since v{sent.version}:' and a "
            "bullet naming each of them), then `invoke rebase`; send-series refuses until then"
        )
    return "\n".join(lines) + "\n" + done.range_diff.rstrip() + "\n" + "\n".join(tail)
