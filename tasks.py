"""invoke tasks: each parses its options and hands over to the kseries package.

`invoke --list` shows them; `invoke --help NAME` documents every option. Each task imports
only the stages it uses, so a task does not pay for the start-up of the others.
"""

from __future__ import annotations

from pathlib import Path

from invoke import Collection, Context, task

from kseries.config import Config
from kseries.ui import console, edge, log

TREE_HELP = "kernel tree to work in (default: tree.path from configs/, else the embedded 7.2 tree)"


@task(
    help={
        "tree": TREE_HELP,
        "remote": "remote to fetch the base from (default: [base] remote, kvm-x86)",
        "branch": "branch of that remote to build on (default: [base] branch, next)",
        "no_fetch": "use the remote-tracking ref as it is, without fetching",
        "continue_": "resume after resolving a conflict (git add the files first)",
        "abort": "undo the stopped run: branch, HEAD and work tree as before it",
    }
)
@edge
def rebase(
    c: Context,
    tree: str = "",
    remote: str = "",
    branch: str = "",
    no_fetch: bool = False,
    continue_: bool = False,
    abort: bool = False,
) -> None:
    """Put the series on the base branch as a fresh, versioned branch (git am -3)."""
    from kseries import rebase as rebase_stage
    from kseries import series as series_stage
    from kseries import tree as tree_stage

    config = Config.load()
    series = series_stage.load(config)
    work = tree_stage.open_tree(config, tree, log=log)
    runner = rebase_stage.Rebase(work, series, log=log)
    if abort:
        runner.abort()
        return
    if continue_:
        result = runner.resume()
    else:
        result = runner.start(
            remote=remote or series.base.remote,
            branch=branch or series.base.branch,
            fetch=not no_fetch,
        )
    console.print(rebase_stage.summary(result), markup=False, soft_wrap=True)
    if result.range_diff:
        console.print(result.range_diff, markup=False, highlight=False, soft_wrap=True)


@task(
    help={"tree": TREE_HELP, "ref": "branch to export (default: the series branch, e.g. <name>-v2)"}
)
@edge
def export(c: Context, tree: str = "", ref: str = "") -> None:
    """Write the series branch's diffs back into patches/ (after resolving a conflict)."""
    from kseries import series as series_stage
    from kseries import tree as tree_stage

    config = Config.load()
    series = series_stage.load(config)
    work = tree_stage.open_tree(config, tree, log=log)
    ref = ref or series.branch
    base = work.git("merge-base", ref, series.base.tracking_ref).strip()
    changed = series_stage.export(work, series, ref, base)
    for path in changed:
        console.print(f"updated {path.relative_to(series.patches_dir.parent)}")
    if not changed:
        console.print("patches/ already matches " + ref)


@task(help={"out": "write one file per message into this directory instead of stdout"})
@edge
def changelog(c: Context, out: str = "") -> None:
    """Render every commit message and the cover letter from templates/, without git."""
    from kseries import changelog as changelog_stage
    from kseries import series as series_stage

    series = series_stage.load()
    writer = changelog_stage.Changelog(series)
    messages = {"0000-cover-letter": writer.cover_letter()}
    messages |= {Path(p.template).stem: writer.message(p) for p in series.patches}
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
    for name, message in messages.items():
        if out:
            (Path(out) / f"{name}.txt").write_text(str(message))
            console.print(f"wrote {Path(out) / name}.txt")
        else:
            console.rule(name)
            console.print(str(message), markup=False, highlight=False, soft_wrap=True)


@task(help={"tree": TREE_HELP})
@edge
def prepare(c: Context, tree: str = "") -> None:
    """Prepare the kernel tree (fetch and import the embedded default if none is configured)."""
    from kseries import tree as tree_stage

    work = tree_stage.open_tree(Config.load(), tree, log=log)
    console.print(f"tree: {work.path}")


@task(help={"tree": TREE_HELP})
@edge
def pipeline(c: Context, tree: str = "") -> None:
    """The main job: prepare the tree, then rebase the series onto the base branch."""
    rebase(c, tree=tree)


@task(
    iterable=["config"],
    help={
        "tree": TREE_HELP,
        "out": "build directory, make's O= (default: per tree, under ~/.cache/kseries/build)",
        "config": "fragment from configs/ (NAME or NAME.config, or a path); repeat for more "
        "(default: [build] fragments, kvm-testbox)",
        "base_config": "tinyconfig, defconfig or a .config path (default: [build] base_config)",
        "jobs": "make -j (default: one per CPU; with --distcc, the hosts' job slots)",
        "target": "bzImage (default), modules, headers, selftests, or one object like "
        "arch/x86/kvm/mmu/mmu.o",
        "distcc": "compile through distcc on these hosts (DISTCC_HOSTS syntax, e.g. "
        "'10.0.0.5/8 10.0.0.6/8'); default: [build] distcc_hosts",
        "verbose": "stream make's own output instead of the progress bar",
    },
)
@edge
def build(
    c: Context,
    tree: str = "",
    out: str = "",
    config: list[str] | None = None,
    base_config: str = "",
    jobs: int = 0,
    target: str = "",
    distcc: str = "",
    verbose: bool = False,
) -> None:
    """Build a kernel of the tree's checked-out branch from configs/ fragments (incremental)."""
    from kseries import build as build_stage

    manifest = build_stage.build(
        Config.load(),
        tree=tree,
        out=out,
        fragments=config or (),
        base_config=base_config,
        jobs=jobs,
        target=target,
        distcc=distcc,
        verbose=verbose,
        log=log,
        console=console,
    )
    console.print(build_stage.summary(manifest), markup=False, highlight=False)


# The namespace is explicit so stage groups (e.g. `testbox.up`) can sit beside top-level tasks.
ns = Collection(rebase, export, changelog, prepare, pipeline, build)
