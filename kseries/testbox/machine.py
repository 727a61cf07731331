"""A box being driven: its SSH session, its console where it has one, whether it is still
running, and how to bring it back (power-cycle) when it stops answering.

For a local QEMU box the console is the serial log, "running" is the QEMU process, and the
power cycle restarts QEMU on the last kernel that booted and answered (plus the box's own
power_cycle command, if it has one). For a remote box the console is the file its
`console_log` names (a conserver or serial-over-LAN log), if any, and the power cycle is the
configured command (IPMI, a PDU, a QEMU monitor's reset), after which the box's default boot
entry, its known-good kernel, is expected to come up. A remote box whose console shows a kernel
panic while it is awaited is given up on at once, not after the whole boot timeout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from kseries.core.run import CommandTimedOut, run
from kseries.errors import ToolkitError
from kseries.testbox.box import Box
from kseries.testbox.qemu import QemuBox, read_since
from kseries.testbox.ssh import HostKeyError, Remote, Unreachable

Log = Callable[[str], None]
BANNER_WAIT = 3.0  # per attempt, while waiting for a box to boot
PANIC = "Kernel panic - not syncing"


class PowerCycleFailed(ToolkitError):
    """The power-cycle command failed or is not configured."""


class Machine:
    def __init__(self, box: Box, *, trust_new_host: bool = False, log: Log = lambda _: None):
        self.box = box
        self.log = log
        self.trust_new_host = trust_new_host
        self.qemu = QemuBox(box, log=log) if box.is_local_qemu else None
        self._remote: Remote | None = None
        self.power_cycles: list[str] = []  # what was done, for the report

    # --- SSH -------------------------------------------------------------------------------

    def ssh_box(self) -> Box:
        return self.qemu.ssh_box() if self.qemu else self.box

    def remote(self) -> Remote:
        """The current session (opened on first use; reopened after a reboot)."""
        box = self.ssh_box()
        if self._remote is None or self._remote.port != box.port:
            self._remote = Remote(box, trust_new_host=self.trust_new_host, log=self.log)
        if self._remote.connection is None or not self._remote.connection.is_connected:
            self._remote.connect()
        return self._remote

    def disconnect(self) -> None:
        if self._remote is not None:
            self._remote.close()

    def wait_for_ssh(self, timeout: float, *, what: str = "SSH", watch: int | None = None) -> float:
        """Connect with backoff (0.2 s growing to 2 s) until `timeout`; return the seconds it
        took. Gives up early if a local box's QEMU exited, or if a remote box's console shows a
        panic after the mark `watch`. A host-key error is not retried."""
        started = time.monotonic()
        deadline = started + timeout
        delay = 0.2
        last = "no attempt"
        while True:
            if not self.alive():
                assert self.qemu is not None
                raise Unreachable(
                    f"box {self.box.name}: QEMU exited while waiting for {what} "
                    f"({self.qemu.exit_reason()})",
                    "see the console log",
                )
            panic = self.panic_line(watch)
            if panic:
                raise Unreachable(
                    f"box {self.box.name}: the kernel panicked while waiting for {what}: {panic}",
                    "see the console log",
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unreachable(
                    f"box {self.box.name}: no {what} after {timeout:g}s ({last})",
                    "see the console log",
                )
            try:
                self.disconnect()
                box = self.ssh_box()
                self._remote = Remote(box, trust_new_host=self.trust_new_host, log=self.log)
                self._remote.connect(
                    timeout=min(self.box.timeouts.connect, max(remaining, 1)),
                    banner_timeout=min(BANNER_WAIT, max(remaining, 0.5)),
                )
                return time.monotonic() - started
            except HostKeyError:
                raise
            except Unreachable as e:
                last = e.message
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 2.0)

    def wait_until_down(self, timeout: float) -> float:
        """After a clean reboot was asked for: wait until the box's sshd stops answering (a
        fresh connection fails), so that the next wait_for_ssh reaches the new boot and not
        the old system on its way down. Returns the seconds it took."""
        started = time.monotonic()
        self.disconnect()
        while time.monotonic() - started < timeout:
            probe = Remote(self.ssh_box(), log=self.log)
            try:
                probe.connect(timeout=self.box.timeouts.connect, banner_timeout=BANNER_WAIT)
            except Unreachable:
                return time.monotonic() - started
            finally:
                probe.close()
            time.sleep(0.5)
        raise Unreachable(
            f"box {self.box.name}: still answering {timeout:g}s after the reboot was asked for",
            "check that `reboot` works on the box",
        )

    # --- console and liveness ----------------------------------------------------------------

    def alive(self) -> bool:
        return self.qemu.running() if self.qemu else True

    def console_mark(self) -> int | None:
        if self.qemu is not None:
            return self.qemu.console_size()
        log = self.box.console_log
        if log is None:
            return None
        return log.stat().st_size if log.exists() else 0

    def console_since(self, mark: int | None) -> str | None:
        if mark is None:
            return None
        if self.qemu is not None:
            return self.qemu.console_since(mark)
        if self.box.console_log is None:
            return None
        return read_since(self.box.console_log, mark)

    def panic_line(self, mark: int | None) -> str:
        """A remote box's console panic line after `mark` ("" if none). A local QEMU box's
        panic ends its QEMU (-no-reboot), which alive() sees."""
        if self.qemu is not None:
            return ""
        text = self.console_since(mark) or ""
        return next((line.strip() for line in text.splitlines() if PANIC in line), "")

    # --- bringing it back ----------------------------------------------------------------------

    def run_power_cycle_command(self) -> None:
        command = self.box.power_cycle
        if not command:
            return
        self.log(f"box {self.box.name}: power-cycling: {command}")
        env = {**os.environ, "KSERIES_BOX": self.box.name, "KSERIES_BOX_HOST": self.box.host}
        try:
            done = run(
                ["sh", "-c", command],
                env=env,
                timeout=max(60.0, self.box.timeouts.connect),
                check=False,
            )
        except CommandTimedOut:
            self.power_cycles.append(f"`{command}` timed out")
            raise PowerCycleFailed(
                f"box {self.box.name}: power-cycle command timed out", "check the command"
            ) from None
        self.power_cycles.append(f"`{command}` exit {done.status}")
        if not done.ok:
            raise PowerCycleFailed(
                f"box {self.box.name}: power-cycle command failed (exit {done.status}): "
                f"{(done.stderr or done.stdout).strip()[-200:]}",
                "fix power_cycle in configs/testboxes.toml",
            )

    def recover(self) -> str:
        """Bring the box back on a kernel that answers; return what was done. Raises if it
        cannot (no power-cycle command, or the box still does not answer)."""
        self.disconnect()
        self.run_power_cycle_command()
        if self.qemu is not None:
            good = self.qemu.good()
            if good is None:
                self.qemu.stop()
                raise PowerCycleFailed(
                    f"box {self.box.name}: no known-good kernel to restart on; the box is down",
                    "start it on a kernel that works: invoke testbox.up --kernel PATH",
                )
            self.qemu.stop()
            kernel, initrd = good
            self.qemu.start(kernel, initrd=initrd)
            self.power_cycles.append(f"QEMU restarted on the known-good kernel {kernel}")
        elif not self.box.power_cycle:
            raise PowerCycleFailed(
                f"box {self.box.name} does not answer and has no power_cycle command",
                "reset it by hand, and set power_cycle in its [box] table",
            )
        try:
            took = self.wait_for_ssh(self.box.timeouts.boot, what="SSH after the power cycle")
        except Unreachable as e:
            raise PowerCycleFailed(
                "; ".join([*self.power_cycles, f"still no answer: {e.message}"]),
                "check the box by hand (console, BMC)",
            ) from None
        done = f"box answers again after {took:.1f}s"
        self.log(f"box {self.box.name}: {done}")
        return "; ".join([*self.power_cycles, done])


def last_lines(text: str | None, count: int = 25) -> list[str]:
    if not text:
        return []
    return [line.rstrip() for line in text.replace("\r", "").splitlines() if line.strip()][-count:]


def write_console(machine: Machine, mark: int | None, path: Path) -> Path | None:
    text = machine.console_since(mark)
    if text is None:
        return None
    path.write_text(text)
    return path
