"""Booting a kernel on a box, and proving afterwards that the box runs exactly that build.

Three methods, chosen by the box's `method`:

- `kexec`: upload the kernel (and initrd), `kexec -l`, then `kexec -e` in the FOREGROUND of an
  exec channel with a short timeout. (Backgrounding it with nohup silently does nothing over
  SSH: the box keeps its old kernel. See ../shared/notes/testbox-lab.md.) A `kexec -e` that
  returns has failed, and says why.
- `grub-reboot`: install the kernel under /boot, let the box's update-grub add it, make it the
  one-shot next entry with grub-reboot, reboot. A failed boot falls back to the default entry
  on the next reset (the power cycle).
- `qemu`: the local box is restarted on the new kernel.

Proof: /proc/version must carry the build's kernelrelease and utsversion (#N, the build user,
host and timestamp), and /proc/sys/kernel/random/boot_id must differ from before the switch.
Anything else is "wrong kernel", never a test result.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kseries.errors import ToolkitError
from kseries.testbox.kernel import Kernel
from kseries.testbox.machine import Machine
from kseries.testbox.ssh import Remote

Log = Callable[[str], None]


class BootError(ToolkitError):
    """The box refused to switch kernels (kexec -l failed, grub-reboot failed, ...)."""


@dataclass(frozen=True)
class Identity:
    proc_version: str
    boot_id: str

    def to_json(self) -> dict[str, str]:
        return {"proc_version": self.proc_version, "boot_id": self.boot_id}


def identify(remote: Remote, timeout: float = 30) -> Identity:
    result = remote.run(
        "cat /proc/version; cat /proc/sys/kernel/random/boot_id", timeout=timeout, check=True
    )
    lines = result.stdout.strip().splitlines()
    if len(lines) < 2:
        raise ToolkitError(f"{remote.address}: unexpected identity output {result.stdout!r}", "")
    return Identity(lines[0].strip(), lines[-1].strip())


def prove(kernel: Kernel, before: Identity | None, after: Identity) -> list[str]:
    """What is wrong with `after` as a boot of `kernel` (empty: proven)."""
    problems = []
    if not kernel.matches(after.proc_version):
        problems.append(
            f"the box runs {after.proc_version!r}, not {kernel.kernelrelease} {kernel.utsversion}"
        )
    if before is not None and before.boot_id == after.boot_id:
        problems.append(f"boot_id {after.boot_id} did not change: the box never rebooted")
    return problems


@dataclass(frozen=True)
class Staged:
    """What a boot needs on this machine: the kernel, an initrd, the command line (with
    `reuse_cmdline`, what to append to the one the box runs with)."""

    kernel: Kernel
    initrd: bytes | None
    initrd_path: Path | None
    cmdline: str
    reuse_cmdline: bool = False


class Method:
    """How a box switches to a new kernel. `boot` returns once the switch has started."""

    name = ""

    def boot(self, machine: Machine, staged: Staged, log: Log) -> dict[str, float]:
        """Start the switch; return the timings of its steps (seconds, for the report)."""
        raise NotImplementedError


def _upload_boot_files(
    machine: Machine, staged: Staged, directory: str, log: Log
) -> tuple[str, str]:
    remote = machine.remote()
    kernel_path = f"{directory}/bzImage-{staged.kernel.sha256[:12]}"
    initrd_path = ""
    present = remote.sha256(kernel_path)
    if present.get(kernel_path) != staged.kernel.sha256:
        remote.upload(staged.kernel.data, kernel_path)
        log(
            f"boot: uploaded {staged.kernel.path.name} ({len(staged.kernel.data) >> 10} KiB), "
            "sha256 verified on the box"
        )
    if staged.initrd is not None:
        sha = hashlib.sha256(staged.initrd).hexdigest()
        initrd_path = f"{directory}/initrd-{sha[:12]}"
        if remote.sha256(initrd_path).get(initrd_path) != sha:
            remote.upload(staged.initrd, initrd_path)
            log(f"boot: uploaded the initrd ({len(staged.initrd) >> 10} KiB), sha256 verified")
    return kernel_path, initrd_path


class Kexec(Method):
    name = "kexec"

    def boot(self, machine: Machine, staged: Staged, log: Log) -> dict[str, float]:
        box = machine.box
        started = time.monotonic()
        kernel_path, initrd_path = _upload_boot_files(machine, staged, box.workdir, log)
        uploaded = time.monotonic()
        load = ["kexec", "-l", kernel_path]
        if initrd_path:
            load.append(f"--initrd={initrd_path}")
        load += kexec_cmdline(staged)
        remote = machine.remote()
        remote.run(shlex.join(load), timeout=120, check=True)
        loaded = time.monotonic()
        log("boot: kexec -l done; kexec -e (foreground, the channel is expected to hang)")
        result = remote.start("kexec -e", wait=box.timeouts.kexec_exec)
        if result is not None:
            output = (result.stderr or result.stdout).strip()
            raise BootError(
                f"{remote.address}: kexec -e returned (exit {result.exit_status}) instead of "
                f"booting: {output or 'no output'}",
                "the box still runs its old kernel; check kexec support (CONFIG_KEXEC)",
            )
        return {"upload": uploaded - started, "kexec_load": loaded - uploaded}


def kexec_cmdline(staged: Staged) -> list[str]:
    """kexec -l's command-line options: kexec-tools appends --append to the line
    --reuse-cmdline reads from /proc/cmdline, so a remote box's kvm_params ride on its own."""
    reuse = ["--reuse-cmdline"] if staged.reuse_cmdline or not staged.cmdline else []
    return reuse + ([f"--append={staged.cmdline}"] if staged.cmdline else [])


GRUB_CFG = "/boot/grub/grub.cfg"


def grub_entry(grub_cfg: str, image: str) -> str:
    """The grub-reboot id of the menu entry whose `linux` line boots `image` (a /boot file
    name), e.g. "gnulinux-advanced-UUID>gnulinux-7.2.13-kseries-advanced-UUID"."""
    stack: list[str] = []
    pending: list[str] = []  # ids of the blocks opened so far, with "" for non-menu blocks
    for raw in grub_cfg.splitlines():
        line = raw.strip()
        opened = re.match(
            r"(submenu|menuentry)\s+(['\"])(.*?)\2.*?(?:\$menuentry_id_option\s+"
            r"'([^']+)')?\s*\{\s*$",
            line,
        )
        if opened:
            stack.append(opened.group(4) or opened.group(3))
            pending.append(opened.group(1))
            continue
        if line.endswith("{"):
            stack.append("")
            pending.append("block")
            continue
        if line == "}" and stack:
            stack.pop()
            pending.pop()
            continue
        if re.match(rf"linux\s+\S*/{re.escape(image)}(\s|$)", line) and pending:
            return ">".join(s for s, kind in zip(stack, pending, strict=True) if kind != "block")
    raise BootError(
        f"{GRUB_CFG} has no menu entry for /boot/{image} after update-grub",
        "check that the box's grub scripts pick up /boot/vmlinuz-* (Debian's 10_linux does)",
    )


class GrubReboot(Method):
    """Untested on real hardware here (no such box is reachable from this machine)."""

    name = "grub-reboot"

    def boot(self, machine: Machine, staged: Staged, log: Log) -> dict[str, float]:
        started = time.monotonic()
        remote = machine.remote()
        release = f"{staged.kernel.kernelrelease}-kseries"
        image = f"vmlinuz-{release}"
        remote.upload(staged.kernel.data, f"/boot/{image}")
        if staged.initrd is not None:
            remote.upload(staged.initrd, f"/boot/initrd.img-{release}")
        remote.run("update-grub", timeout=300, check=True)
        cfg = remote.run(f"cat {GRUB_CFG}", timeout=30, check=True).stdout
        entry = grub_entry(cfg, image)
        remote.run(f"grub-reboot {shlex.quote(entry)}", timeout=60, check=True)
        log(f"boot: grub-reboot {entry!r}; rebooting")
        remote.start("reboot", wait=machine.box.timeouts.kexec_exec)
        return {"install": time.monotonic() - started}


class QemuRestart(Method):
    name = "qemu"

    def boot(self, machine: Machine, staged: Staged, log: Log) -> dict[str, float]:
        assert machine.qemu is not None and staged.initrd_path is not None
        started = time.monotonic()
        machine.disconnect()
        machine.qemu.stop()
        stopped = time.monotonic()
        machine.qemu.start(staged.kernel.path, initrd=staged.initrd_path, cmdline=staged.cmdline)
        return {"qemu_stop": stopped - started}


METHODS: dict[str, type[Method]] = {m.name: m for m in (Kexec, GrubReboot, QemuRestart)}


def method(name: str) -> Method:
    return METHODS[name]()
