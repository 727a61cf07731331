"""`invoke testbox.up / down / status / console`: the local QEMU box's lifecycle."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kseries.core.files import write_atomic
from kseries.errors import ToolkitError
from kseries.testbox import boot, kernel
from kseries.testbox.box import Box
from kseries.testbox.machine import Machine, last_lines

Log = Callable[[str], None]


@dataclass(frozen=True)
class Status:
    box: str
    running: bool
    pid: int
    port: int
    accel: str
    cpu: str
    kernel: str
    proc_version: str
    console: str
    ssh: str  # how to log in by hand

    def lines(self) -> list[str]:
        state = "running" if self.running else "down"
        out = [f"box {self.box}: {state}"]
        if self.running:
            out += [
                f"  pid      {self.pid} ({self.accel}, -cpu {self.cpu})",
                f"  ssh      {self.ssh}",
                f"  kernel   {self.proc_version or self.kernel}",
            ]
        out.append(f"  console  {self.console}")
        return out


def _machine(box: Box, log: Log) -> Machine:
    if not box.is_local_qemu:
        raise ToolkitError(f"box {box.name} is not a local QEMU box", "testbox.* manage those")
    return Machine(box, log=log)


def up(box: Box, *, kernel_spec: str = "", restart: bool = False, log: Log = print) -> Status:
    """Start the box on `kernel_spec` (default: its known-good kernel, else the last build),
    wait for SSH, prove the kernel, and remember it as known-good."""
    machine = _machine(box, log)
    qemu = machine.qemu
    assert qemu is not None
    if qemu.running():
        if not restart:
            log(f"box {box.name} is already running")
            return status(box, log=log)
        qemu.stop()
    good = qemu.good()
    if kernel_spec or good is None:
        subject = kernel.load(kernel_spec)
        image = qemu.dir / "kernels" / f"bzImage-{subject.sha256[:12]}"
        if not image.is_file():
            write_atomic(image, subject.data)
        initrd = qemu.initramfs()
    else:
        image, initrd = good
        subject = kernel.load(str(image))
    started = time.monotonic()
    mark = qemu.console_size()
    qemu.start(image, initrd=initrd)
    try:
        machine.wait_for_ssh(box.timeouts.boot, what="SSH")
    except ToolkitError as e:
        tail = "\n".join(last_lines(qemu.console_since(mark), 15))
        qemu.stop()
        raise ToolkitError(
            f"{e.message}; last console lines:\n{tail}",
            "try another kernel: invoke testbox.up --kernel PATH",
        ) from None
    identity = boot.identify(machine.remote())
    problems = boot.prove(subject, None, identity)
    if problems:
        raise ToolkitError(f"box {box.name}: {'; '.join(problems)}", "see the console log")
    qemu.remember_good(subject.data, initrd, identity.to_json())
    log(f"box {box.name}: up in {time.monotonic() - started:.1f}s on {subject.label}")
    machine.disconnect()
    return status(box, log=log)


def down(box: Box, *, log: Log = print) -> bool:
    machine = _machine(box, log)
    assert machine.qemu is not None
    stopped = machine.qemu.stop()
    if not stopped:
        log(f"box {box.name} was not running")
    return stopped


def status(box: Box, *, log: Log = print) -> Status:
    machine = _machine(box, log)
    qemu = machine.qemu
    assert qemu is not None
    state = qemu.state()
    running = qemu.running()
    version = ""
    if running:
        try:
            machine.wait_for_ssh(min(box.timeouts.connect, 5))
            version = boot.identify(machine.remote()).proc_version
        except ToolkitError as e:
            version = f"(no SSH: {e.message})"
        finally:
            machine.disconnect()
    ssh_box = qemu.ssh_box()
    login = (
        f"ssh -i {ssh_box.identity} -o UserKnownHostsFile={ssh_box.known_hosts} "
        f"-p {state.port} root@127.0.0.1"
    )
    return Status(
        box.name,
        running,
        state.pid,
        state.port,
        state.accel,
        state.cpu,
        state.kernel,
        version,
        str(qemu.console_log),
        login,
    )


def console(box: Box, *, lines: int = 50) -> str:
    """The last `lines` lines of the box's serial console log."""
    machine = _machine(box, lambda _: None)
    assert machine.qemu is not None
    text = machine.qemu.console_since(max(0, machine.qemu.console_size() - 256 * 1024))
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])
