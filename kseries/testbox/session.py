"""`invoke test-remote`: boot a build on one or more boxes, prove it, run the tests, judge.

For each box (several run in parallel threads, like Fabric's ThreadingGroup) and each kernel
(the build under test, and with --compare the reference too), `BoxSession.run` does:

1. reach the box and record its identity (a local QEMU box that is down is started on its
   known-good kernel first, unless the method restarts it anyway);
2. boot the kernel with the box's method;
3. wait for SSH with backoff under the boot timeout; on a timeout save the console, power-cycle
   the box back onto a kernel that answers, and stop with "boot failed";
4. prove the identity (/proc/version and a changed boot_id), else stop with "wrong kernel";
5. upload and run the tests, collect dmesg and scan it;
6. keep everything under the output directory: console.log, dmesg.txt, one file per test.

`test_remote` composes these, writes report.json and junit.xml, and returns the runs.
"""

from __future__ import annotations

import datetime
import hashlib
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from kseries import records
from kseries.config import Config
from kseries.core.files import exclusive, write_atomic
from kseries.core.files import output_dir as checked_output_dir
from kseries.core.run import run
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.paths import PROJECT, cache_dir
from kseries.testbox import boot, kernel, mmu, suite
from kseries.testbox.box import Box, TestboxConfig
from kseries.testbox.group import Group
from kseries.testbox.lavajob import LavaSession, cancel_all
from kseries.testbox.machine import Machine, last_lines, write_console
from kseries.testbox.qemu import QemuBox
from kseries.testbox.report import UNDER_TEST, Run
from kseries.testbox.runner import collect_dmesg, run_tests, save_outputs, scan_dmesg
from kseries.testbox.ssh import HostKeyError, Unreachable, UploadError
from kseries.testbox.trace import FaultTrace, Trace

Log = Callable[[str], None]


@dataclass(frozen=True)
class Subject:
    """A kernel to run, with the label its column gets."""

    label: str
    kernel: kernel.Kernel


class BoxSession:
    """One box, driven through one or more kernels in turn."""

    def __init__(
        self,
        box: Box,
        *,
        trust_new_host: bool = False,
        dmesg_ignore: Sequence[str] = (),
        tracer: FaultTrace | None = None,
        log: Log = print,
    ) -> None:
        self.box = box
        self.tracer = tracer
        self.log = lambda m: log(f"{box.name}: {m}")
        self.machine = Machine(box, trust_new_host=trust_new_host, log=self.log)
        self.dmesg_ignore = tuple(dmesg_ignore)
        self.method = boot.method(box.method)

    # --- the parts of a run --------------------------------------------------------------------

    def staged(self, subject: kernel.Kernel) -> boot.Staged:
        box, qemu = self.box, self.machine.qemu
        initrd_path = box.initrd or (qemu.initramfs() if qemu else None)
        cmdline = qemu.kernel_cmdline(box.cmdline) if qemu else box.with_kvm_params(box.cmdline)
        if qemu is not None and self.method.name == "qemu":
            # QEMU reads the image from disk at start: give it a private copy, so a rebuild of
            # the tree's bzImage in the meantime cannot change what boots.
            private = qemu.dir / "kernels" / f"bzImage-{subject.sha256[:12]}"
            if not private.is_file():
                write_atomic(private, subject.data)
            subject = replace(subject, path=private)
        initrd = initrd_path.read_bytes() if initrd_path else None
        reuse = qemu is None and not box.cmdline  # kexec keeps the box's own line
        return boot.Staged(subject, initrd, initrd_path, cmdline, reuse_cmdline=reuse)

    def reach(self) -> boot.Identity | None:
        """The identity before the switch; None when a local box is (re)started anyway."""
        qemu = self.machine.qemu
        if qemu is not None and not qemu.running():
            if self.method.name == "qemu":
                return None
            good = qemu.good()
            if good is None:
                raise ToolkitError(
                    f"box {self.box.name} is down and has no known-good kernel to start on",
                    "start it once: invoke testbox.up --box " + self.box.name,
                )
            self.log("box is down: starting it on its known-good kernel first")
            qemu.start(good[0], initrd=good[1])
            self.machine.wait_for_ssh(self.box.timeouts.boot)
        elif qemu is not None and self.method.name == "qemu":
            try:
                self.machine.wait_for_ssh(self.box.timeouts.connect)
            except Unreachable:
                return None  # it is restarted anyway
        else:
            self.machine.wait_for_ssh(self.box.timeouts.connect)
        return boot.identify(self.machine.remote())

    def run(self, subject: Subject, tests: Sequence[suite.Built], directory: Path) -> Run:
        directory.mkdir(parents=True, exist_ok=True)
        k = subject.kernel
        record = Run(self.box.name, subject.label, k.to_json(), directory=directory)
        started = time.monotonic()
        mark = self.machine.console_mark()
        try:
            self._run(record, subject, tests, directory, mark)
        except HostKeyError as e:
            record.verdict, record.reason = "error", f"{e.message} (hint: {e.hint})"
        except ToolkitError as e:
            record.verdict, record.reason = "error", str(e)
            self._ensure_answering(record)
        finally:
            self._clean_up(record)
            record.timings["total"] = time.monotonic() - started
            console = write_console(self.machine, mark, directory / "console.log")
            if console:
                record.files["console"] = str(console)
            self.machine.disconnect()
            record.save(directory)
        self.log(record.outcome)
        return record

    def _run(
        self,
        record: Run,
        subject: Subject,
        tests: Sequence[suite.Built],
        directory: Path,
        mark: int | None,
    ) -> None:
        box, machine = self.box, self.machine
        t = time.monotonic()
        try:
            before = self.reach()
        except Unreachable as e:
            record.verdict, record.reason = "unreachable", e.message
            record.recovery = self._recover()
            if not record.recovery.startswith("FAILED"):
                record.reason += "; it answers again after the power cycle, but was not tested"
            return
        record.timings["reach"] = time.monotonic() - t
        record.before = before.to_json() if before else None
        staged = self.staged(subject.kernel)
        t = time.monotonic()
        mark = machine.console_mark() if mark is None else mark
        try:
            record.timings.update(self.method.boot(machine, staged, self.log))
        except boot.BootError as e:
            record.verdict, record.reason = "boot failed", str(e)
            self._ensure_answering(record)
            return
        except UploadError as e:
            record.verdict, record.reason = "error", str(e)
            return
        record.timings["switch"] = time.monotonic() - t
        try:
            machine.wait_for_ssh(box.timeouts.boot, what="SSH on the new kernel", watch=mark)
        except Unreachable as e:
            record.timings["boot"] = time.monotonic() - t
            record.verdict, record.reason = "boot failed", e.message
            record.console_tail = last_lines(machine.console_since(mark))
            record.recovery = self._recover()
            return
        record.timings["boot"] = time.monotonic() - t
        record.timings["to_ssh"] = record.timings["boot"] - record.timings["switch"]
        after = boot.identify(machine.remote())
        record.after = after.to_json()
        problems = boot.prove(subject.kernel, before, after)
        if problems and before and after.proc_version == before.proc_version:
            # It rebooted, but into the kernel it ran before: the new one did not come up (a
            # panic with panic=N, a watchdog, GRUB's fallback to the saved entry).
            record.verdict = "boot failed"
            record.reason = f"the box came back on its previous kernel: {after.proc_version}"
            record.console_tail = last_lines(machine.console_since(mark))
            return
        if problems:
            record.verdict, record.reason = "wrong kernel", "; ".join(problems)
            return
        self.log(
            f"{subject.label}: proven: {after.proc_version.split(' (')[0]} "
            f"{subject.kernel.utsversion}, boot_id {after.boot_id[:8]}"
        )
        if machine.qemu is not None and staged.initrd_path is not None:
            machine.qemu.remember_good(staged.kernel.data, staged.initrd_path, record.after)
        record.kvm = mmu.read(machine.remote(), box.kvm_claims)
        self.log(f"{subject.label}: MMU {record.kvm.mmu}, CPU {record.kvm.cpu or '?'}")
        t = time.monotonic()
        remote = machine.remote()
        traced = self.tracer.attach(remote) if self.tracer else None
        env = {"KSERIES_BOX": box.name, **box.env}
        record.tests = run_tests(
            remote,
            tests,
            workdir=box.workdir,
            default_timeout=box.timeouts.test,
            env=env,
            box_vars=box.vars,
            where=f"box {box.name}",
            log=self.log,
        )
        record.timings["tests"] = time.monotonic() - t
        if self.tracer and traced:
            try:
                record.trace = self.tracer.collect(machine.remote(), traced)
            except ToolkitError as e:
                record.trace = Trace(available=False, reason=f"collecting the counts failed: {e}")
        if any(r.status == "timeout" for r in record.tests):
            # what the box's console said while the test hung (watchdog dumps, lockups)
            record.console_tail = last_lines(machine.console_since(mark))
        save_outputs(directory / "tests", record.tests)
        try:
            dmesg = collect_dmesg(machine.remote())
        except Unreachable:
            record.verdict, record.reason = "fail", "the box stopped answering during the tests"
            record.console_tail = last_lines(machine.console_since(mark))
            record.recovery = self._recover()
            return
        (directory / "dmesg.txt").write_text(dmesg)
        record.files["dmesg"] = str(directory / "dmesg.txt")
        record.splats = scan_dmesg(dmesg, self.dmesg_ignore)
        record.conclude()

    def _clean_up(self, record: Run) -> None:
        """Remove what the boot method installed on the box (grub-reboot: the kernel and its
        menu entry), on whichever kernel the box now runs; a failure is reported, not raised."""
        if record.verdict == "unreachable" or record.recovery.startswith("FAILED"):
            return
        try:
            record.timings.update(self.method.cleanup(self.machine, self.log))
        except ToolkitError as e:
            self.log(f"cleanup failed: {e}")
            record.recovery = "; ".join(filter(None, [record.recovery, f"cleanup failed: {e}"]))

    def _recover(self) -> str:
        try:
            return self.machine.recover()
        except ToolkitError as e:
            return f"FAILED: {e}"

    def _ensure_answering(self, record: Run) -> None:
        """After an error, make sure the box still answers; bring it back if not."""
        try:
            self.machine.wait_for_ssh(self.box.timeouts.connect)
        except HostKeyError:
            return
        except Unreachable:
            record.recovery = self._recover()
        except ToolkitError as e:
            record.recovery = f"FAILED: {e}"


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
    sha = _commit(tree, spec)
    key = hashlib.sha256(str(tree).encode()).hexdigest()[:10]
    base = cache_dir() / "testbox" / "compare" / f"{tree.name}-{key}"
    # Laid out like ~/.cache/kseries/{default-tree/linux,build/NAME}: the build stage makes
    # ccache hash paths relative to the common parent, so the two share cache hits.
    worktree = base / "default-tree" / "linux"
    from kseries import build as build_stage

    # One comparison at a time per tree: the worktree's checkout is this build's input.
    with exclusive(base / ".lock", f"compare: waiting for another comparison in {base}", log):
        if not (worktree / ".git").exists():
            log(f"compare: adding a detached worktree of {tree} at {worktree}")
            if worktree.exists():  # what a killed `worktree add` left: ours, under our lock
                shutil.rmtree(worktree)
            run(["git", "-C", tree, "worktree", "prune"])
            run(["git", "-C", tree, "worktree", "add", "-f", "--detach", worktree, sha])
        else:
            run(["git", "-C", worktree, "checkout", "-q", "--detach", sha])
        log(f"compare: building {spec} ({sha[:12]}) with the build stage")
        # The reference is not "the last build": the pointer stays on the kernel under test.
        manifest = build_stage.build(
            config, tree=str(worktree), out=str(base / "build" / "linux"), log=log, set_last=False
        )
    return kernel.load(str(manifest.path))


# --- composing it all ------------------------------------------------------------------------


def _commit(tree: Path, spec: str) -> str:
    done = run(["git", "-C", tree, "rev-parse", "--verify", f"{spec}^{{commit}}"], check=False)
    if not done.ok:
        raise ToolkitError(
            f"--compare {spec}: not a file and not a commit in {tree}",
            "pass a branch, tag or sha of the tree, or a bzImage",
        )
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
    chosen = [settings.box(name) for name in (boxes or [""])]
    labs = [box.name for box in chosen if box.lava]
    if trace and labs:  # refused before any build, not silently dropped after
        raise ToolkitError(
            f"--trace: {labs[0]} is a LAVA lab box; the fault-path probes need an SSH session",
            "drop --trace, or trace on an SSH or local box (e.g. --box local)",
        )
    if keep_warm is None:
        keep_warm = settings.settings().get("keep_warm", False)
    with terminate_as_interrupt(), _stopping_what_it_starts(chosen, keep_warm, log):
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
        builder = suite.Builder(tree, log=log)
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
                "wall_time_s": round(time.monotonic() - started, 3),
                "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
        )
        if under_test.branch and (Path(under_test.tree) / ".git").exists():  # send's evidence
            records.remember_test_report(
                WorkTree(Path(under_test.tree)),
                under_test.to_json(),
                written,
                [b.name for b in chosen if b.is_local_qemu],
            )
        latest = directory.parent / "latest"
        if not out and (not latest.exists() or latest.is_symlink()):
            latest.unlink(missing_ok=True)
            latest.symlink_to(directory.name)
        return runs, directory


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI job's timeout, `kill`, systemd) ends the run as Ctrl-C does: LAVA jobs
    canceled, builds and local boxes stopped; by default it would kill the process at once and
    leave the lab's job running. Only the main thread can take signals: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
