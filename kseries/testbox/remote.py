"""`invoke test-remote`: boot a build on one or more boxes, prove it, run the tests, judge.

For each box (side by side, a `Group`) and each kernel (the build under test, and with
--compare the reference too, built here by the build stage), a session runs it: an SSH box's
`BoxSession` (session.py) or a LAVA lab's `LavaSession` (lavajob.py). `test_remote` composes
them, writes report.json and junit.xml, and returns the runs.
"""

from __future__ import annotations

import datetime
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kseries import records
from kseries.build.manifest import Manifest
from kseries.build.meson import FIRMWARE_DIR
from kseries.config import Config
from kseries.core.files import exclusive
from kseries.core.files import output_dir as checked_output_dir
from kseries.core.run import run
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.paths import PROJECT, compare_dir, series_suffix, worktree_dir
from kseries.testbox import kernel, suite
from kseries.testbox.box import Box, TestboxConfig
from kseries.testbox.group import Group
from kseries.testbox.lavajob import LavaSession, cancel_all
from kseries.testbox.qemu import QemuBox
from kseries.testbox.report import UNDER_TEST, Run
from kseries.testbox.session import BoxSession, Log, Subject
from kseries.testbox.trace import FaultTrace
from kseries.workspace import Workspace

# --- the reference kernel for --compare ----------------------------------------------------------


def reference(spec: str, under_test: kernel.Kernel, config: Config, log: Log) -> kernel.Kernel:
    """--compare REF: a bzImage or manifest path, or a git ref of the tested kernel's tree,
    built by the build stage in a detached worktree under ~/.cache/kseries/testbox/compare
    (kept, so the next comparison rebuilds incrementally)."""
    path = Path(spec).expanduser()
    if path.exists():
        return kernel.load(str(path))
    if not under_test.tree:
        raise ToolkitError(
            f"--compare {spec}: not a file, and the kernel under test names no tree",
            "pass a bzImage or manifest, or test a kernel built by `invoke build`",
        )
    tree = Path(under_test.tree)
    manifest = build_at(config, tree, _commit(tree, spec, f"--compare {spec}"), spec, log)
    return kernel.load(str(manifest.path))


def build_at(config: Config, tree: Path, sha: str, what: str, log: Log) -> Manifest:
    """The build stage's build of commit `sha` of `tree` (configured by `config`), in a
    detached worktree under ~/.cache/kseries/testbox/compare, kept so the next one rebuilds
    incrementally, one build directory per series. It is not "the last build": that pointer
    stays on the kernel under test."""
    base = compare_dir(tree)
    worktree = worktree_dir(base, tree)
    from kseries import build as build_stage

    # One build at a time per tree: the worktree's checkout is this build's input.
    with exclusive(base / ".lock", f"compare: waiting for another comparison in {base}", log):
        if not (worktree / ".git").exists():
            log(f"compare: adding a detached worktree of {tree} at {worktree}")
            if worktree.exists():  # what a killed `worktree add` left: ours, under our lock
                shutil.rmtree(worktree)
            run(["git", "-C", tree, "worktree", "prune"])
            run(["git", "-C", tree, "worktree", "add", "-f", "--detach", worktree, sha])
        else:
            run(["git", "-C", worktree, "checkout", "-q", "--detach", sha])
        log(f"compare: building {what} ({sha[:12]}) with the build stage")
        out = base / "build" / (tree.name + series_suffix(config.series_key))
        return build_stage.build(config, tree=str(worktree), out=str(out), log=log, set_last=False)


@dataclass(frozen=True)
class SeriesBuild:
    """A test's "series:NAME[@N]" file as built: the commit of which branch, and the image."""

    series: str
    tree: Path
    branch: str
    commit: str
    patches: int | None  # None: the branch's tip, the series as it is sent
    image: Path
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "series": self.series,
            "tree": str(self.tree),
            "branch": self.branch,
            "commit": self.commit,
            "patches": self.patches,
            "sha256": self.sha256,
        }


class SeriesBuilder:
    """What builds a test's "series:NAME[@N]" files: that series' branch at its tip, or after
    its first N patches (the stock VMM beside the patched one), each built once a run. It
    keeps what it built: the report names them, and a series tested at its tip gets the
    report as its own evidence."""

    def __init__(self, config: Config, log: Log) -> None:
        self.config = config
        self.log = log
        self._built: dict[tuple[str, int | None], SeriesBuild] = {}

    def __call__(self, name: str, patches: int | None) -> Path:
        key = (name, patches)
        if key not in self._built:
            self._built[key] = self._build(name, patches)
        return self._built[key].image

    def box(self, box: Box) -> Box:
        """`box` running the QEMU it names: a local box's qemu.binary "series:NAME" is that
        series built at its tip by the build stage, with its firmware (BUILD/firmware) first
        on QEMU's -L path."""
        qemu = box.qemu
        if qemu is None or not qemu.series:
            return box
        image = self(qemu.series, None)
        firmware = image.parent / FIRMWARE_DIR
        first = ("-L", str(firmware)) if firmware.is_dir() else ()
        built = replace(qemu, binary=str(image), extra_args=(*first, *qemu.extra_args))
        return replace(box, qemu=built)

    @property
    def builds(self) -> list[SeriesBuild]:
        """Each build once, in the order they were made (@N of N is the tip)."""
        return list(dict.fromkeys(self._built.values()))

    def _build(self, name: str, patches: int | None) -> SeriesBuild:
        other = Workspace(Config.load(self.config.configs, series=name), log=self.log)
        count, branch = len(other.series.patches), other.series.branch
        if patches is not None and patches > count:
            raise ToolkitError(
                f"series:{name}@{patches}: the series has {count} patches", f"use 1..{count}"
            )
        whole = patches is None or patches == count
        ref = branch if whole else f"{branch}~{count - patches}"
        tree = other.work.path
        sha = _commit(tree, ref, f"series:{name}", f"run `invoke rebase --series {name}`")
        manifest = build_at(other.config, tree, sha, f"series {name} at {ref}", self.log)
        if manifest.image is None:
            raise ToolkitError(f"series {name}: its build made no image", "see its build log")
        return SeriesBuild(
            name,
            tree,
            branch,
            sha,
            None if whole else patches,
            Path(manifest.image.path),
            manifest.image.sha256,
        )


# --- composing it all ------------------------------------------------------------------------


def _commit(
    tree: Path,
    spec: str,
    what: str,
    hint: str = "pass a branch, tag or sha of the tree, or a bzImage",
) -> str:
    done = run(["git", "-C", tree, "rev-parse", "--verify", f"{spec}^{{commit}}"], check=False)
    if not done.ok:
        raise ToolkitError(f"{what}: {spec} is not a file and not a commit in {tree}", hint)
    return done.stdout.strip()


def output_dir(out: str) -> Path:
    if out:
        return checked_output_dir(Path(out)).resolve()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return PROJECT / "out" / "test-remote" / stamp


def test_remote(
    config: Config,
    *,
    boxes: Sequence[str] = (),
    kernel_spec: str = "",
    tests: Sequence[str] = (),
    compare: str = "",
    cycles: int = 0,
    duration: float = 0,
    trace: bool = False,
    trust_new_host: bool = False,
    out: str = "",
    keep_warm: bool | None = None,
    log: Log = print,
) -> tuple[list[Run], Path]:
    """Run the whole thing; return the runs (box-major, reference first) and the output dir.

    Local QEMU boxes this run starts are stopped at its end, however it ends, unless
    `keep_warm` (default: [testbox] keep_warm); any local box left running is named, with the
    command that stops it."""
    directory = output_dir(out)  # refused now, not after the builds, if it cannot be written
    settings = TestboxConfig.load(config)
    series_builds = SeriesBuilder(config, log)
    chosen = [settings.box(name) for name in (boxes or [""])]
    labs = [box.name for box in chosen if box.lava]
    if trace and labs:  # refused before any build, not silently dropped after
        raise ToolkitError(
            f"--trace: {labs[0]} is a LAVA lab box; the fault-path probes need an SSH session",
            "drop --trace, or trace on an SSH or local box (e.g. --box local)",
        )
    if keep_warm is None:
        keep_warm = settings.settings().get("keep_warm", False)
    chosen = [series_builds.box(box) for box in chosen]  # a box's own QEMU built first
    with _stopping_what_it_starts(chosen, keep_warm, log):
        started = time.monotonic()
        known = suite.load_tests(settings)
        specs = suite.soak(suite.select(known, tests), cycles, duration, known)
        under_test = kernel.load(kernel_spec)
        label = UNDER_TEST
        subjects = [Subject(label, under_test)]
        if compare:
            ref = reference(compare, under_test, config, log)
            same = (ref.kernelrelease, ref.utsversion) == (
                under_test.kernelrelease,
                under_test.utsversion,
            )
            if same and ref.sha256 != under_test.sha256:
                raise ToolkitError(
                    f"--compare {compare}: both kernels call themselves {ref.kernelrelease} "
                    f"{ref.utsversion}, so /proc/version could not tell which one a box runs",
                    "rebuild one of them (each build gets its own #N and timestamp)",
                )
            subjects = [Subject(f"ref {_ref_name(compare)}", ref), Subject(label, under_test)]
        tree = Path(under_test.tree) if under_test.tree else None
        builder = suite.Builder(tree, log=log, series=series_builds)
        built = [builder.build(spec) for spec in specs]
        for b in built:
            if b.error:
                log(f"tests: {b.spec.name} not built: {b.error}")
        directory.mkdir(parents=True, exist_ok=True)
        defaults = settings.settings()
        ignore = defaults.get("dmesg_ignore", [])
        functions = defaults.get("trace", {}) if trace else {}
        if trace and not functions:
            raise ToolkitError(
                f"--trace: no functions to probe in {settings.directory / 'testboxes.toml'}",
                'set [testbox] trace = { kvm_mmu_faultin_pfn = "int", ... }',
            )
        tracer = FaultTrace(functions) if trace else None
        lock = threading.Lock()

        def locked_log(message: str) -> None:
            with lock:
                log(message)

        def one_box(box: Box) -> list[Run]:
            session: BoxSession | LavaSession
            if box.lava is not None:
                session = LavaSession(box, dmesg_ignore=ignore, log=locked_log)
            else:
                session = BoxSession(
                    box,
                    trust_new_host=trust_new_host,
                    dmesg_ignore=ignore,
                    tracer=tracer,
                    log=locked_log,
                )
            return [session.run(s, built, directory / box.name / _safe(s.label)) for s in subjects]

        try:
            results = Group(chosen).run(one_box)
        except KeyboardInterrupt:
            cancel_all(log)  # Ctrl-C reaches this thread only: cancel the other boxes' LAVA jobs
            raise
        runs = [r for box_runs in results.values_or_raise() for r in box_runs]
        from kseries.testbox import report

        written, _ = report.write(
            directory,
            runs,
            {
                "kernel": under_test.to_json(),
                "compare": compare or None,
                "boxes": [b.name for b in chosen],
                "tests": [s.name for s in specs],
                "soak": {"cycles": cycles, "duration_s": duration} if cycles or duration else None,
                "series_builds": [b.to_json() for b in series_builds.builds],
                "wall_time_s": round(time.monotonic() - started, 3),
                "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
        )
        local_qemu = [b.name for b in chosen if b.is_local_qemu]
        if under_test.branch and (Path(under_test.tree) / ".git").exists():  # send's evidence
            records.remember_test_report(
                WorkTree(Path(under_test.tree)), under_test.to_json(), written, local_qemu
            )
        for build in series_builds.builds:  # a companion series tested as it is sent: its own
            if build.patches is None:
                records.remember_test_report(
                    WorkTree(build.tree),
                    {"branch": build.branch, "commit": build.commit},
                    written,
                    local_qemu,
                )
        latest = directory.parent / "latest"
        if not out and (not latest.exists() or latest.is_symlink()):
            latest.unlink(missing_ok=True)
            latest.symlink_to(directory.name)
        return runs, directory


@contextmanager
def _stopping_what_it_starts(boxes: Sequence[Box], keep_warm: bool, log: Log) -> Iterator[None]:
    """Stop the local QEMU boxes that were down before the run, however it ends (a 3 GiB QEMU
    must not outlive the job that started it), unless they are to be kept warm; name any local
    box left running, with the command that stops it."""
    local = [QemuBox(box) for box in boxes if box.is_local_qemu]
    cold = {qemu.box.name for qemu in local if not qemu.running()}
    try:
        yield
    finally:
        for qemu in local:
            if qemu.box.name in cold and not keep_warm:
                qemu.stop()
            elif qemu.running():
                why = "kept warm" if qemu.box.name in cold else "it was running before this run"
                log(
                    f"box {qemu.box.name} is still running ({why}): "
                    f"stop it with `invoke testbox.down --box {qemu.box.name}`"
                )


def _ref_name(spec: str) -> str:
    """A short column name: the git ref as given; for a file, the build directory of a
    BUILD/arch/x86/boot/{bzImage,manifest.json}, else the directory holding it."""
    path = Path(spec).expanduser()
    if not path.is_file():
        return spec
    if path.parent.match("arch/x86/boot") and len(path.parents) > 3:
        return path.parents[3].name
    return path.parent.name


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
