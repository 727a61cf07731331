"""The local QEMU test box: started, restarted on another kernel, and stopped by kseries.

QEMU runs detached (its own session) so the box outlives the `invoke` that started it. SSH is
forwarded from 127.0.0.1 only, on a free port chosen at the first start and kept while it stays
free (so the pinned known_hosts entry stays valid). The serial console is appended to
console.log in the box's state directory; `-no-reboot` turns a guest reboot or a panic
(`panic=-1`) into QEMU exiting, which is how a failed boot is noticed at once.

The box is stopped by the PID it was started with, after checking that the PID still is that
QEMU (its command line names this state directory), never by process name.

Acceleration: `auto` uses /dev/kvm only where it can run the guest. Some hosts' /dev/kvm cannot
(this machine's is a PVM flavour: QEMU aborts setting MSRs), so the first auto start on a host
tries KVM, falls back to TCG if the box does not come up, and remembers the outcome per host
kernel and QEMU version.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kseries.core.files import write_atomic
from kseries.core.run import Popen, TimeoutExpired, run, start
from kseries.errors import ToolkitError
from kseries.paths import testbox_dir
from kseries.testbox import initramfs
from kseries.testbox.box import Box

Log = Callable[[str], None]
READY = "kseries-box: userspace up"
READY_KVM = "kvm="  # the same console line says kvm=yes or kvm=no
KVM_PROBE = 20.0  # seconds a KVM guest gets to reach userspace (it needs about 2)
DEFAULT_CMDLINE = "console=ttyS0 panic=-1"


@dataclass
class QemuState:
    """What state.json records about the running (or last) QEMU process."""

    pid: int = 0
    port: int = 0
    accel: str = ""
    cpu: str = ""
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    started_at: float = 0.0
    console_offset: int = 0  # console.log size when this QEMU started

    @classmethod
    def load(cls, path: Path) -> QemuState:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as QEMU's hostfwd does
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def host_tsc_khz() -> int:
    """The host's TSC frequency in kHz (0 if unknown). Under TCG the guest's TSC counts at the
    host's rate, but a tinyconfig guest (no ACPI: no HPET or PM timer to calibrate against)
    cannot measure it, and a KVM in the guest with tsc_khz 0 fails every KVM selftest in
    kvm_arch_vm_post_create() ("KVM_GET_TSC_KHZ did not provide a valid TSC frequency")."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_since(path: Path, offset: int) -> str:
    """A log file's text from `offset` on ("" if it cannot be read): a console so far."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def shared_dir() -> Path:
    """Keys and the initramfs are shared by all local boxes."""
    return testbox_dir()


class QemuBox:
    """One local QEMU box and its state directory:

    state.json, console.log, qemu.log (QEMU's own stderr), known_hosts, and good/ (a copy of
    the last kernel that booted and answered, the one a failed boot falls back to).
    """

    def __init__(self, box: Box, *, log: Log = lambda _: None) -> None:
        if box.qemu is None:
            raise ToolkitError(f"box {box.name} is not a local QEMU box", "use its own tools")
        self.box = box
        self.settings = box.qemu
        self.dir = box.state_dir
        self.log = log
        self._child: Popen[bytes] | None = None
        keys_dir = self.dir / "keys" if self.settings.state_dir else shared_dir() / "keys"
        self.keys = initramfs.Keys(keys_dir)

    # --- files -----------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def good_dir(self) -> Path:
        return self.dir / "good"

    def kernel_cmdline(self, base: str, accel: str | None = None) -> str:
        """The box's command line with its kvm_params; under TCG with tsc_early_khz= set from
        the host (see host_tsc_khz) unless the configured line already has it or qemu.tsc_khz
        is 0."""
        cmdline = self.box.with_kvm_params(base or self.box.cmdline or DEFAULT_CMDLINE)
        accel = accel or self.state().accel
        khz = self.settings.tsc_khz if self.settings.tsc_khz >= 0 else host_tsc_khz()
        if accel == "tcg" and khz > 0 and "tsc_early_khz=" not in cmdline:
            cmdline += f" tsc_early_khz={khz}"
        return cmdline

    def state(self) -> QemuState:
        return QemuState.load(self.state_file)

    def initramfs(self) -> Path:
        """The box's userspace image (built or reused)."""
        base = self.dir if self.settings.state_dir else shared_dir()
        return initramfs.build(base / "initramfs.cpio.gz", self.keys.ensure())

    def ssh_box(self) -> Box:
        """The box as SSH sees it: 127.0.0.1, the forwarded port, kseries' own key files."""
        from dataclasses import replace

        return replace(
            self.box,
            host="127.0.0.1",
            port=self.state().port or self.box.port,
            identity=self.keys.identity,
            known_hosts=self.known_hosts,
        )

    # --- process -----------------------------------------------------------------------------

    def running(self) -> bool:
        state = self.state()
        return bool(state.pid) and self._is_ours(state.pid)

    def _is_ours(self, pid: int) -> bool:
        if self._child is not None and self._child.pid == pid:
            # Our own child: Popen knows. (Reading /proc/PID/cmdline right after Popen returns
            # can race with the exec still setting up the new argv and read it empty.)
            return self._child.poll() is None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        # Ours: a kseries QEMU whose console log is in this state directory. (Several box
        # definitions may share one state directory, i.e. one QEMU, with different methods.)
        console_arg = f"path={self.console_log},".encode()
        return (
            status != "Z"
            and bool(cmdline)
            and cmdline[0].rsplit(b"/", 1)[-1].startswith(b"qemu-system")
            and any(console_arg in arg for arg in cmdline)
        )

    def command(self, kernel: Path, initrd: Path, cmdline: str, port: int, accel: str) -> list[str]:
        s = self.settings
        return [
            s.binary,
            "-name",
            f"kseries-{self.box.name}",
            "-accel",
            "tcg,thread=single" if accel == "tcg" and s.tcg_thread == "single" else accel,
            "-cpu",
            s.cpu,
            "-m",
            s.memory,
            "-smp",
            str(s.smp),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            cmdline,
            "-netdev",
            f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device",
            "virtio-net-pci,netdev=n0",
            "-chardev",
            f"file,id=console,path={self.console_log},append=on",
            "-serial",
            "chardev:console",
            "-monitor",
            "none",
            *s.extra_args,
        ]

    def start(
        self,
        kernel: Path,
        *,
        initrd: Path | None = None,
        cmdline: str = "",
    ) -> QemuState:
        """Start QEMU on `kernel` (the box must be down) and return its state; waiting for SSH
        is the caller's (Machine.wait_for_ssh). On the first automatic start on a host, KVM is
        tried first (see _probe_kvm)."""
        if self.running():
            raise ToolkitError(f"box {self.box.name} is already running", "invoke testbox.down")
        self.dir.mkdir(parents=True, exist_ok=True)
        initrd = initrd or self.initramfs()
        previous = self.state()
        port = self.box.port or previous.port
        if not port or not port_is_free(port):
            port = free_port()
        self.known_hosts.write_text(f"[127.0.0.1]:{port} {self.keys.ensure().host_public()}\n")
        accel = self._accel()
        state = self._spawn(kernel, initrd, self.kernel_cmdline(cmdline, accel), port, accel)
        if self.settings.accel == "auto" and accel == "kvm" and not self._accel_known():
            state = self._probe_kvm(state, kernel, initrd, cmdline, port)
        return state

    def _probe_kvm(
        self, state: QemuState, kernel: Path, initrd: Path, cmdline: str, port: int
    ) -> QemuState:
        """First auto start on this host: KVM counts as usable if the guest reaches userspace
        with a /dev/kvm of its own (nested virtualization) within KVM_PROBE seconds. If not,
        and TCG then boots the same kernel, TCG is remembered for this host; if TCG fails too,
        the kernel is to blame and nothing is remembered."""
        ok, why = self.wait_console(state, timeout=KVM_PROBE, raise_=False)
        if ok and f"{READY_KVM}yes" in self.console_since(state.console_offset):
            self._remember_accel("kvm", "")
            return state
        if ok:
            why = "the guest has no /dev/kvm (no nested virtualization)"
        self.log(f"qemu: KVM cannot run this box ({why}); using TCG")
        self.stop()
        state = self._spawn(kernel, initrd, self.kernel_cmdline(cmdline, "tcg"), port, "tcg")
        tcg_ok, _ = self.wait_console(state, timeout=KVM_PROBE * 6, raise_=False)
        if tcg_ok:
            self._remember_accel("tcg", f"{why}; {self.qemu_error()}".strip("; "))
        return state

    def _accel_known(self) -> bool:
        return self._host_key() in self._accel_memory()

    def _spawn(self, kernel: Path, initrd: Path, cmdline: str, port: int, accel: str) -> QemuState:
        offset = self.console_log.stat().st_size if self.console_log.exists() else 0
        command = self.command(kernel, initrd, cmdline, port, accel)
        with (self.dir / "qemu.log").open("ab") as err:
            err.write(f"\n# {time.ctime()}: {' '.join(command)}\n".encode())
            err.flush()
            child = start(command, stdout=err, stderr=err, new_session=True)
        self._child = child
        state = QemuState(
            pid=child.pid,
            port=port,
            accel=accel,
            cpu=self.settings.cpu,
            kernel=str(kernel),
            initrd=str(initrd),
            cmdline=cmdline,
            started_at=time.time(),
            console_offset=offset,
        )
        state.save(self.state_file)
        self.log(
            f"qemu: started box {self.box.name} (pid {child.pid}, {accel}, -cpu "
            f"{self.settings.cpu}, ssh on 127.0.0.1:{port})"
        )
        return state

    def wait_console(
        self, state: QemuState, *, timeout: float, raise_: bool = True, since: int | None = None
    ) -> tuple[bool, str]:
        """Wait until the console shows the userspace marker (after `since`, default: this
        QEMU's start) or QEMU exits. (True, "") or (False, why)."""
        deadline = time.monotonic() + timeout
        since = state.console_offset if since is None else since
        while time.monotonic() < deadline:
            if READY in self.console_since(since):
                return True, ""
            if not self._is_ours(state.pid):
                why = "QEMU exited: " + (self.qemu_error() or "see the console log")
                if raise_:
                    raise ToolkitError(f"box {self.box.name}: {why}", f"see {self.console_log}")
                return False, why
            time.sleep(0.1)
        why = f"no userspace after {timeout:g}s"
        if raise_:
            raise ToolkitError(f"box {self.box.name}: {why}", f"see {self.console_log}")
        return False, why

    def stop(self, timeout: float = 10) -> bool:
        """Stop QEMU by its recorded PID (checked to be ours). False if it was not running."""
        state = self.state()
        if not state.pid or not self._is_ours(state.pid):
            self._reap()
            return False
        try:
            os.kill(state.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._is_ours(state.pid):
            time.sleep(0.05)
        if self._is_ours(state.pid):
            os.kill(state.pid, signal.SIGKILL)
            while self._is_ours(state.pid):
                time.sleep(0.05)
        self._reap()
        self.log(f"qemu: stopped box {self.box.name} (pid {state.pid})")
        return True

    def _reap(self) -> None:
        if self._child is not None:
            with contextlib.suppress(TimeoutExpired):
                self._child.wait(timeout=5)

    def exit_reason(self) -> str:
        """Why QEMU is gone, as far as can be told: its exit status (if it was our child) and
        the last line it wrote."""
        parts = []
        if self._child is not None and self._child.poll() is not None:
            code = self._child.returncode
            parts.append(f"signal {-code}" if code < 0 else f"exit status {code}")
        said = self.qemu_error()
        if said:
            parts.append(said)
        return ", ".join(parts) or "no message from QEMU"

    # --- console -----------------------------------------------------------------------------

    def console_since(self, offset: int) -> str:
        return read_since(self.console_log, offset)

    def console_size(self) -> int:
        return self.console_log.stat().st_size if self.console_log.exists() else 0

    def qemu_error(self) -> str:
        """The last line QEMU itself wrote (an abort message, say)."""
        try:
            lines = (self.dir / "qemu.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        last = [x for x in lines if x and not x.startswith("# ")]
        return last[-1] if last and not lines[-1].startswith("# ") else ""

    # --- the known-good kernel ---------------------------------------------------------------

    def remember_good(self, kernel: bytes, initrd: Path, identity: dict[str, Any]) -> None:
        """Keep a copy of a kernel that booted and answered (the bytes that were proven, not
        the file, which a rebuild may have changed since): the fallback for a failed boot."""
        for data, name in ((kernel, "bzImage"), (initrd.read_bytes(), "initrd")):
            target = self.good_dir / name
            if not (target.is_file() and target.read_bytes() == data):
                write_atomic(target, data)
        write_atomic(self.good_dir / "identity.json", json.dumps(identity, indent=2) + "\n")

    def good(self) -> tuple[Path, Path] | None:
        kernel, initrd = self.good_dir / "bzImage", self.good_dir / "initrd"
        return (kernel, initrd) if kernel.is_file() and initrd.is_file() else None

    # --- acceleration ----------------------------------------------------------------------

    def _accel(self) -> str:
        wanted = self.settings.accel
        if wanted != "auto":
            return wanted
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg"
        known = self._accel_memory().get(self._host_key())
        return known["accel"] if known else "kvm"

    def _host_key(self) -> str:
        version = run([self.settings.binary, "--version"], check=False).stdout.split("\n")[0]
        return f"{platform.release()} | {version} | {self.settings.cpu}"

    def _accel_memory(self) -> dict[str, Any]:
        try:
            return json.loads((shared_dir() / "accel.json").read_text())
        except (OSError, ValueError):
            return {}

    def _remember_accel(self, accel: str, why: str) -> None:
        memory = self._accel_memory()
        memory[self._host_key()] = {"accel": accel, "why": why}
        write_atomic(shared_dir() / "accel.json", json.dumps(memory, indent=2) + "\n")
