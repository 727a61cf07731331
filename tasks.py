"""invoke tasks: each parses its options and hands over to the kseries package.

`invoke --list` shows them; `invoke --help NAME` documents every option. Each task imports
only the stages it uses, so a task does not pay for the start-up of the others.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke import Collection, Context, task

from kseries.core.files import output_dir
from kseries.errors import ToolkitError
from kseries.ui import confirm, console, edge, log, number
from kseries.workspace import SERIES_HELP, Workspace

if TYPE_CHECKING:
    from kseries.build import Manifest

TREE_HELP = "kernel tree to work in (default: tree.path from configs/, else the embedded 7.2 tree)"
KEEP_WARM_HELP = (
    "leave the local QEMU boxes this run starts running afterwards (default: [testbox] keep_warm, "
    "false: they are stopped)"
)


@task(
    help={
        "series": SERIES_HELP,
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
    series: str = "",
) -> None:
    """Put the series on the base branch as a fresh, versioned branch (git am -3)."""
    _rebase(Workspace.open(series, tree, log), remote, branch, no_fetch, continue_, abort)


def _rebase(
    ws: Workspace,
    remote: str = "",
    branch: str = "",
    no_fetch: bool = False,
    continue_: bool = False,
    abort: bool = False,
) -> None:
    work = ws.work
    # A fresh run must find the tree clean: git's 90k lstat()s start now, behind the imports.
    clean = work.clean_check() if not (abort or continue_) else None
    from kseries import rebase as rebase_stage

    runner = rebase_stage.Rebase(work, ws.series, log=log)
    if abort:
        runner.abort()
        return
    if continue_:
        result = runner.resume()
    else:
        result = runner.start(
            remote=remote or ws.series.base.remote,
            branch=branch or ws.series.base.branch,
            fetch=not no_fetch,
            clean=clean,
        )
    console.print(rebase_stage.summary(result), markup=False, soft_wrap=True)
    if result.range_diff:
        console.print(result.range_diff, markup=False, highlight=False, soft_wrap=True)


@task(
    help={
        "series": SERIES_HELP,
        "tree": TREE_HELP,
        "ref": "branch to export (default: the series branch, e.g. <name>-v2)",
    }
)
@edge
def export(c: Context, tree: str = "", ref: str = "", series: str = "") -> None:
    """Write the series branch's diffs back into patches/ (after resolving a conflict).

    A commit message edited on the branch is not exported (prose lives in templates/): it is
    shown as a diff against the rendered message, naming the template to change."""
    from kseries import changelog as changelog_stage
    from kseries import records
    from kseries import series as series_stage

    ws = Workspace.open(series, tree, log)
    chosen, work = ws.series, ws.work
    ref = ref or chosen.branch
    base = records.series_base(work, ref, chosen.base.tracking_ref)
    exported = series_stage.export(work, chosen, ref, base)
    for path in exported.changed:
        console.print(f"updated {path.relative_to(ws.config.project)}")
    if not exported.changed:
        console.print(f"{chosen.patches_dir.relative_to(ws.config.project)}/ already matches {ref}")
    edits = changelog_stage.Changelog(chosen).edits(work, exported.commits)
    for edit in edits:
        console.print(edit.diff, markup=False, highlight=False, soft_wrap=True)
    if edits:
        raise ToolkitError(
            f"{ref}: the commit message of {', '.join(e.patch.label for e in edits)} was edited "
            f"and is not exported; change {', '.join(str(e.template) for e in edits)} instead",
            "the diff above goes from the rendered message to the branch's; the next "
            "`invoke rebase` renders the template again",
        )


@task(
    help={
        "series": SERIES_HELP,
        "out": "write one file per message into this directory instead of stdout",
    }
)
@edge
def changelog(c: Context, out: str = "", series: str = "") -> None:
    """Render every commit message and the cover letter from templates/, without git."""
    from kseries import changelog as changelog_stage

    chosen = Workspace.open(series, log=log).series
    writer = changelog_stage.Changelog(chosen)
    messages = {"0000-cover-letter": writer.cover_letter()}
    messages |= {Path(p.template).stem: writer.message(p) for p in chosen.patches}
    directory = output_dir(Path(out)) if out else None
    for name, message in messages.items():
        if directory:
            (directory / f"{name}.txt").write_text(str(message))
            console.print(f"wrote {directory / name}.txt")
        else:
            console.rule(name)
            console.print(str(message), markup=False, highlight=False, soft_wrap=True)


@task(help={"series": SERIES_HELP, "tree": TREE_HELP})
@edge
def prepare(c: Context, tree: str = "", series: str = "") -> None:
    """Prepare the series' tree (fetch and import the embedded default if none is configured)."""
    console.print(f"tree: {Workspace.open(series, tree, log).work.path}")


@task(
    help={
        "series": SERIES_HELP,
        "tree": TREE_HELP,
        "boxes": "test boxes to boot the series on, one run of the default tests (default: "
        "[[pipeline.run]] in configs/testboxes.toml: the three MMUs on local, local-legacy-tdp "
        "and local-shadow, then the kernel+QEMU pair on local-pair)",
        "compare": "also test this ref of the tree, side by side (default: the series' base)",
        "no_compare": "test only the series kernel",
        "no_check": "skip `invoke check` (the per-commit builds of every gate)",
        "keep_warm": KEEP_WARM_HELP,
    }
)
@edge
def pipeline(
    c: Context,
    tree: str = "",
    boxes: str = "",
    compare: str = "",
    no_compare: bool = False,
    no_check: bool = False,
    keep_warm: bool = False,
    series: str = "",
) -> None:
    """The main job: rebase, check, build, test base vs series, mails (dry run), status.

    The other series the test runs build (the QEMU series, the pair box's outer QEMU) are
    rebased on their own bases too. The mails' dry run also shows the sent record a real
    send would write. The stages share one workspace: configs/ is read once, the tree
    opened once."""
    from kseries.testbox import plan as plan_stage

    ws = Workspace.open(series, tree, log)
    base = ws.series.base
    runs = [plan_stage.TestRun(tuple(_names([boxes])))] if boxes else plan_stage.runs(ws.boxes)
    _rebase(ws)
    for other in plan_stage.series_used(ws.boxes, runs):
        _rebase(Workspace.open(other, log=log))
    if not no_check:
        _check(ws)
    manifest = _build(ws)
    for run in runs:
        _test_remote(
            ws,
            boxes=list(run.boxes),
            kernel=manifest.path,
            compare="" if no_compare else compare or f"{base.remote}/{base.branch}",
            keep_warm=keep_warm,
            tests=list(run.tests),
        )
    _send_series(ws)
    _status(ws)


@task(
    iterable=["config"],
    help={
        "series": SERIES_HELP,
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
    jobs: str = "0",
    target: str = "",
    distcc: str = "",
    verbose: bool = False,
    series: str = "",
) -> None:
    """Build a kernel of the tree's checked-out branch from configs/ fragments (incremental)."""
    _build(
        Workspace.open(series, tree, log),
        out=out,
        fragments=config or (),
        base_config=base_config,
        jobs=number("jobs", jobs, int, 0),
        target=target,
        distcc=distcc,
        verbose=verbose,
    )


def _build(ws: Workspace, **options: Any) -> Manifest:
    from kseries import build as build_stage

    manifest = build_stage.build(ws.config, tree=ws.tree, log=log, console=console, **options)
    console.print(build_stage.summary(manifest), markup=False, highlight=False, soft_wrap=True)
    return manifest


@task(
    iterable=["gate"],
    help={
        "series": SERIES_HELP,
        "tree": TREE_HELP,
        "gate": "run only this gate ([[check.gate]] in configs/toolkit.toml); repeat for more",
    },
)
@edge
def check(c: Context, tree: str = "", gate: list[str] | None = None, series: str = "") -> None:
    """Build every commit of the series in each gate's config; fail on new warnings."""
    _check(Workspace.open(series, tree, log), _names(gate))


def _check(ws: Workspace, gates: list[str] | None = None) -> None:
    from kseries import check as check_stage

    results = check_stage.check(ws.config, ws.series, ws.work, gates=gates or (), log=log)
    console.print(check_stage.table(results))
    for line in check_stage.details(results):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if not all(r.ok for r in results):
        raise SystemExit(1)


@task(
    help={
        "series": SERIES_HELP,
        "tree": TREE_HELP,
        "out": "directory for the mails (default: out/<branch>/ in this project)",
        "dry_run": "write the mails and show what git send-email would do (the default; "
        "says so explicitly, e.g. in a script: refused together with --send)",
        "send": "really send, after every check passed and a confirmation",
        "yes": "with --send: do not ask for confirmation",
        "untested": "no Testing section in the cover letter, so no test-remote report of "
        "the branch is needed (default: the newest report of exactly this commit, or refused)",
    }
)
@edge
def send_series(
    c: Context,
    tree: str = "",
    out: str = "",
    dry_run: bool = False,
    send: bool = False,
    yes: bool = False,
    untested: bool = False,
    series: str = "",
) -> None:
    """Format the series as mails, address and check them, then git send-email (dry run)."""
    if dry_run and send:
        raise ToolkitError("--dry-run and --send contradict each other", "choose one")
    if send and not yes and not sys.stdin.isatty():
        raise ToolkitError(
            "--send asks before sending, and there is no terminal to ask on",
            "run it in a terminal, or add --yes to send without asking (after a dry run)",
        )
    _send_series(Workspace.open(series, tree, log), out, send, yes, untested)


def _send_series(
    ws: Workspace, out: str = "", send: bool = False, yes: bool = False, untested: bool = False
) -> None:
    from kseries import send as send_stage
    from kseries.review import sent as sent_stage

    config, series, work = ws.config, ws.series, ws.work
    postman = send_stage.Postman(
        work, series, send_stage.SendSettings(config, series), testing=not untested
    )
    outbox = postman.format(Path(out) if out else config.project / "out" / series.branch)
    if not send:
        delivery = postman.rehearse(outbox)
        console.print(send_stage.report(outbox))
    else:
        postman.check(outbox, sending=True)
        console.print(send_stage.report(outbox))
        if not yes and not confirm(f"send {len(outbox.mails)} mails? [y/N] "):
            console.print("not sent")
            return
        delivery = postman.send(outbox, dry_run=False)
    console.print(delivery.log(), markup=False, highlight=False, soft_wrap=True)
    if outbox.failed:
        raise SystemExit(1)
    record = sent_stage.record_send(config, work, series, outbox, dry_run=not send)
    heading = "recorded" if send else "a real send would record"
    console.print(f"{heading} in {series.source.parent / 'review.toml'}:")
    console.print("\n".join(record), markup=False, highlight=False, soft_wrap=True)


@task(
    help={
        "series": SERIES_HELP,
        "mbox": "read the replies from this mbox file instead of the archive",
        "url": "the public-inbox to read the thread from (default: [review] archive, lore)",
        "version": "the sent version whose replies to read (default: the newest sent)",
        "apply": "write the new trailers into configs/ (review.toml; new people into "
        "series.toml's [people])",
        "changed_too": "with --apply: also apply trailers given on a patch that has changed "
        "since (default: they are only shown, as reviewers expect)",
    }
)
@edge
def trailers(
    c: Context,
    mbox: str = "",
    url: str = "",
    version: str = "0",
    apply: bool = False,
    changed_too: bool = False,
    series: str = "",
) -> None:
    """Collect Reviewed-by, Acked-by, Tested-by, ... from the replies to the sent version."""
    from kseries.review import replies as review

    ws = Workspace.open(series, log=log)
    config = ws.config
    found = review.collect(
        config,
        ws.series,
        mbox=Path(mbox) if mbox else None,
        url=url,
        version=number("version", version, int, 0),
    )
    console.print(review.table(found))
    for line in review.notes(found):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if apply:
        for line in review.apply(config, found, changed_too=changed_too):
            console.print(line, markup=False, highlight=False, soft_wrap=True)


@task(
    help={
        "series": SERIES_HELP,
        "tree": TREE_HELP,
        "no_fetch": "use the remote-tracking ref as it is, without fetching",
    }
)
@edge
def new_version(c: Context, tree: str = "", no_fetch: bool = False, series: str = "") -> None:
    """Start the next version of the sent series: bump it, rebase, range-diff against sent/."""
    from kseries.review import version as version_stage

    ws = Workspace.open(series, tree, log)
    done = version_stage.new_version(ws.config, ws.work, fetch=not no_fetch, log=log)
    console.print(version_stage.summary(done), markup=False, highlight=False, soft_wrap=True)


@task(help={"series": SERIES_HELP, "tree": TREE_HELP})
@edge
def status(c: Context, tree: str = "", series: str = "") -> None:
    """Where the series stands: version, what was sent, trailers, branch vs data, verdicts."""
    _status(Workspace.open(series, tree, log))


def _status(ws: Workspace) -> None:
    from kseries.review import status as status_stage

    shown = status_stage.status(ws.series, ws.work, ws.config.project / "out")
    console.print(str(shown), markup=False, highlight=False, soft_wrap=True)


@task
@edge
def doctor(c: Context) -> None:
    """Check that every external tool the stages use works here (runs it); name the fixes."""
    from kseries import doctor as doctor_stage

    doctor_stage.main(console)


BOX_HELP = "box name from configs/testboxes.toml (default: [testbox] default, i.e. local)"


def _names(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated option values, flattened: --tests a,b --tests c."""
    return [n.strip() for v in values or () for n in v.split(",") if n.strip()]


@task(
    iterable=["box", "tests"],
    help={
        "series": SERIES_HELP,
        "box": BOX_HELP + "; repeat for several boxes",
        "boxes": "several boxes, comma-separated (run in parallel)",
        "kernel": "bzImage or manifest.json to test (default: the last `invoke build`)",
        "tests": "tests to run, by name (repeat or comma-separate; default: the default set)",
        "compare": "also test this reference (a git ref of the kernel's tree, built by the build "
        "stage, or a bzImage/manifest) and show both side by side",
        "cycles": "soak: run the soak tests (vfio-bar-race) for N cycles each",
        "duration": "soak: run the soak tests for S seconds each (with --cycles: whichever ends "
        "first)",
        "trace": "probe the fault path during the tests (kprobe events, [testbox] trace) and "
        "report calls and return values",
        "trust_new_host": "record an unknown host key in the box's known_hosts (a changed key "
        "is still refused)",
        "out": "output directory (default: out/test-remote/TIMESTAMP)",
        "keep_warm": KEEP_WARM_HELP,
    },
)
@edge
def test_remote(
    c: Context,
    box: list[str] | None = None,
    boxes: str = "",
    kernel: str = "",
    tests: list[str] | None = None,
    compare: str = "",
    cycles: str = "0",
    duration: str = "0",
    trace: bool = False,
    trust_new_host: bool = False,
    out: str = "",
    keep_warm: bool = False,
    series: str = "",
) -> None:
    """Boot the built kernel on test boxes, prove it is that build, run the tests, judge."""
    _test_remote(
        Workspace.open(series, log=log),
        boxes=_names(box) + _names([boxes]),
        kernel=kernel,
        tests=_names(tests),
        compare=compare,
        cycles=number("cycles", cycles, int, 0),
        duration=number("duration", duration, float, 0.0),
        trace=trace,
        trust_new_host=trust_new_host,
        out=out,
        keep_warm=keep_warm,
    )


def _test_remote(
    ws: Workspace, boxes: list[str], kernel: str, compare: str, keep_warm: bool, **options: Any
) -> None:
    from kseries.testbox import remote
    from kseries.testbox import report as report_stage

    runs, directory = remote.test_remote(
        ws.config,
        boxes=boxes,
        kernel_spec=kernel,
        compare=compare,
        keep_warm=keep_warm or None,
        log=log,
        **options,
    )
    console.print(report_stage.table(runs))
    for table in report_stage.soak_tables(runs) + report_stage.matrix_tables(runs):
        console.print(table)
    for line in report_stage.details(runs):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {directory / 'report.json'}, {directory / 'junit.xml'}")
    if not report_stage.overall(runs, reference_may_fail=bool(compare)):
        raise SystemExit(1)


def _local_boxes(box: str) -> list:
    settings = Workspace.open(log=log).boxes
    if box:
        return [settings.box(box)]
    return [b for b in (settings.box(n) for n in settings.names()) if b.is_local_qemu]


@task(
    help={
        "box": BOX_HELP,
        "kernel": "bzImage or manifest.json (default: the box's known-good kernel, else the "
        "last build)",
        "restart": "stop the box first if it is running",
    }
)
@edge
def testbox_up(c: Context, box: str = "", kernel: str = "", restart: bool = False) -> None:
    """Start the local QEMU test box, wait for SSH and prove which kernel it runs."""
    from kseries.testbox import local as local_box
    from kseries.testbox.remote import SeriesBuilder

    ws = Workspace.open(log=log)
    chosen = SeriesBuilder(ws.config, log).box(ws.boxes.box(box))  # its own QEMU built first
    status = local_box.up(chosen, kernel_spec=kernel, restart=restart, log=log)
    console.print("\n".join(status.lines()), markup=False, highlight=False, soft_wrap=True)


@task(help={"box": BOX_HELP + " (default: every local box)"})
@edge
def testbox_down(c: Context, box: str = "") -> None:
    """Stop the local QEMU test box (by the PID it was started with)."""
    from kseries.testbox import local as local_box

    for one in _local_boxes(box):
        if local_box.down(one, log=log):
            console.print(f"box {one.name}: stopped")


@task(help={"box": BOX_HELP + " (default: every local box)"})
@edge
def testbox_status(c: Context, box: str = "") -> None:
    """Show whether the local test box runs, which kernel, and how to ssh into it."""
    from kseries.testbox import local as local_box

    for one in _local_boxes(box):
        lines = local_box.status(one, log=log).lines()
        console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


@task(help={"box": BOX_HELP, "lines": "how many lines to show (default 50)"})
@edge
def testbox_console(c: Context, box: str = "", lines: str = "50") -> None:
    """Show the end of the local test box's serial console log."""
    from kseries.testbox import local as local_box

    count = number("lines", lines, int, 1)
    text = local_box.console(Workspace.open(log=log).boxes.box(box), lines=count)
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@task(help={"mirror": "Debian archive URL (default: the one this machine's apt sources use)"})
@edge
def testbox_distro_image(c: Context, mirror: str = "") -> None:
    """Build (once) the Debian bookworm disk image of the grub-reboot box; say how to boot it."""
    from kseries.testbox import distro

    made = distro.build_image(mirror=mirror, log=log)
    box = distro.DiskBox(made, distro.image_dir() / "box", port=2222)
    lines = [
        f"image       {made.disk} (run boxes on a qcow2 overlay of it)",
        f"identity    {made.identity}",
        f"host key    {made.host_public()}",
        f"initrd      {made.initramfs()} (for a test kernel without disk drivers)",
        "boot it:    qemu-img create -f qcow2 -F raw -b IMAGE OVERLAY, then",
        "            " + " ".join(box.command(Path("OVERLAY"))),
        "its box:    " + ", ".join(f"{k} = {v!r}" for k, v in box.box_table().items()),
    ]
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


# The namespace is explicit so stage groups (e.g. `testbox.up`) can sit beside top-level tasks.
ns = Collection(
    rebase,
    export,
    changelog,
    prepare,
    pipeline,
    build,
    check,
    send_series,
    trailers,
    new_version,
    status,
    test_remote,
    doctor,
)
testbox = Collection("testbox")
testbox.add_task(testbox_up, name="up")
testbox.add_task(testbox_down, name="down")
testbox.add_task(testbox_status, name="status")
testbox.add_task(testbox_console, name="console")
testbox.add_task(testbox_distro_image, name="distro-image")
ns.add_collection(testbox)
