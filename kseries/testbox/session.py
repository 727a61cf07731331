"""One box, one kernel at a time, over SSH: `BoxSession.run` does

1. reach the box and record its identity (a local QEMU box that is down is started on its
   known-good kernel first, unless the method restarts it anyway);
2. boot the kernel with the box's method;
3. wait for SSH with backoff under the boot timeout; on a timeout save the console, power-cycle
   the box back onto a kernel that answers, and stop with "boot failed";
4. prove the identity (/proc/version and a changed boot_id), else stop with "wrong kernel";
5. upload and run the tests, collect dmesg and scan it;
6. keep everything under the output directory: console.log, dmesg.txt, one file per test.

`invoke test-remote` (kseries/testbox/remote.py) runs one per box, side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kseries.core.files import write_atomic
from kseries.errors import ToolkitError
from kseries.testbox import boot, kernel, mmu, suite
from kseries.testbox.box import Box
from kseries.testbox.machine import Machine, last_lines, write_console
from kseries.testbox.report import Run
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
        tests = [built.with_kernel(k.data) for built in tests]
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
