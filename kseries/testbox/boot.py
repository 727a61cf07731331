"""Booting a kernel on a box, and proving afterwards that the box runs exactly that build.

Three methods, chosen by the box's `method`:

- `kexec`: upload the kernel (and initrd), `kexec -l`, then `kexec -e` in the FOREGROUND of an
  exec channel with a short timeout. (Backgrounding it with nohup silently does nothing over
  SSH: the box keeps its old kernel. See ../shared/notes/testbox-lab.md.) A `kexec -e` that
  returns has failed, and says why.
- `grub-reboot`: refuse a box whose GRUB has no saved known-good default (GRUB_DEFAULT=saved
  and a saved_entry), install the kernel under /boot/kseries with a menu entry of its own
  (panic=N on its command line), update-grub, make it the one-shot next entry with grub-reboot,
  reboot. A failed boot falls back to the saved entry on the next reset (the panic's own
  reboot, or the power cycle). The kernel and its entry are removed after the run.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kseries.errors import ToolkitError
from kseries.testbox.kernel import Kernel
from kseries.testbox.machine import Machine
from kseries.testbox.ssh import Remote, Unreachable

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

    def cleanup(self, machine: Machine, log: Log) -> dict[str, float]:
        """Remove what `boot` installed on the box (after the run, on whichever kernel it is
        on); return the timings. Nothing, for methods that install nothing lasting."""
        return {}


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


def grub_entries(grub_cfg: str) -> Iterator[tuple[str, str]]:
    """(grub-reboot id, kernel path) of each menu entry of a grub.cfg, in order; the id of an
    entry in a submenu is "SUBMENU>ENTRY", e.g. "gnulinux-advanced-UUID>gnulinux-6.1.0-...-UUID"."""
    stack: list[str] = []
    kinds: list[str] = []  # of the blocks opened so far: submenu, menuentry or block (if, ...)
    for raw in grub_cfg.splitlines():
        line = raw.strip()
        opened = re.match(
            r"(submenu|menuentry)\s+(['\"])(.*?)\2.*?(?:\$menuentry_id_option\s+"
            r"'([^']+)')?\s*\{\s*$",
            line,
        )
        if opened:
            stack.append(opened.group(4) or opened.group(3))
            kinds.append(opened.group(1))
            continue
        if line.endswith("{"):
            stack.append("")
            kinds.append("block")
            continue
        if line == "}" and stack:
            stack.pop()
            kinds.pop()
            continue
        linux = re.match(r"linux\s+(\S+)", line)
        if linux and "menuentry" in kinds:
            ids = [s for s, kind in zip(stack, kinds, strict=True) if kind != "block"]
            yield ">".join(ids), linux.group(1)


def grub_entry(grub_cfg: str, image: str) -> str:
    """The grub-reboot id of the menu entry whose `linux` line boots `image` (a file name)."""
    for entry, path in grub_entries(grub_cfg):
        if path.rsplit("/", 1)[-1] == image:
            return entry
    raise BootError(
        f"{GRUB_CFG} has no menu entry for {image} after update-grub",
        "check that the box's /etc/grub.d scripts run (update-grub's output says)",
    )


class BoxNotReady(ToolkitError):
    """The box is not set up for the method (nothing was changed on it)."""


GRUB_SCRIPT = Path(__file__).with_name("grub-entry.sh")
GRUB_HOOK = "/etc/grub.d/45_kseries"
GRUB_KERNELS = "/boot/kseries"
PANIC_REBOOT = 10  # panic=N for a test kernel: a panic reboots the box into its default
# How grub-mkconfig reads the settings: /etc/default/grub, then /etc/default/grub.d/*.cfg.
GRUB_DEFAULT_CMD = (
    'sh -c \'. /etc/default/grub; for f in /etc/default/grub.d/*.cfg; do [ -e "$f" ] && . "$f"; '
    'done; echo "GRUB_DEFAULT=$GRUB_DEFAULT"\'; grub-editenv list'
)


def grub_fallback(settings: str, grub_cfg: str) -> str:
    """The known-good entry a failed test kernel falls back to, from the output of
    GRUB_DEFAULT_CMD and the box's grub.cfg; BoxNotReady, with the fix, if there is none.

    With Debian's stock GRUB_DEFAULT=0 the default is whatever update-grub sorts first, and a
    one-shot entry that hangs is retried by nothing: the box must boot a saved entry (one named
    by its id, that exists and is not a kseries test kernel)."""
    values = dict(line.split("=", 1) for line in settings.splitlines() if "=" in line)
    default, saved = values.get("GRUB_DEFAULT", ""), values.get("saved_entry", "")
    entries = list(grub_entries(grub_cfg))
    example = next((e for e, path in entries if ">" in e and GRUB_KERNELS not in path), "ID")
    fix = (
        "on the box: set GRUB_DEFAULT=saved in /etc/default/grub, then run "
        f"`grub-set-default '{example}'` (a known-good kernel's entry) and `update-grub`"
    )
    if default != "saved":
        raise BoxNotReady(
            f"GRUB_DEFAULT={default or '(unset)'}: the box boots whichever entry update-grub "
            "sorts first, so a test kernel that fails to boot would have no fallback",
            fix,
        )
    if not saved:
        raise BoxNotReady("GRUB_DEFAULT=saved but grub-editenv has no saved_entry", fix)
    found = [path for entry, path in entries if entry == saved]
    if not found:
        raise BoxNotReady(
            f"the saved default entry {saved!r} is not in {GRUB_CFG}",
            f"{fix}; entry ids: {', '.join(e for e, _ in entries[:4])}",
        )
    if GRUB_KERNELS in found[0]:
        raise BoxNotReady(f"the saved default entry {saved!r} is a kseries test kernel", fix)
    return saved


class GrubReboot(Method):
    """Boot once into the test kernel with grub-reboot; the box's saved default entry stays
    the known-good kernel, which a reset (a panic with panic=N, or the power cycle) falls back
    to. The kernel goes to /boot/kseries/, its entry comes from our /etc/grub.d script (so
    10_linux never lists it), and both are removed after the run."""

    name = "grub-reboot"

    def boot(self, machine: Machine, staged: Staged, log: Log) -> dict[str, float]:
        started = time.monotonic()
        remote = machine.remote()
        cfg = remote.run(f"cat {GRUB_CFG}", timeout=30, check=True).stdout
        settings = remote.run(GRUB_DEFAULT_CMD, timeout=30, check=True).stdout
        try:
            fallback = grub_fallback(settings, cfg)
        except BoxNotReady as e:
            raise BoxNotReady(f"{remote.address}: {e.message}", e.hint) from None
        kernel = staged.kernel
        image = f"{GRUB_KERNELS}/vmlinuz-{kernel.kernelrelease}-{kernel.sha256[:12]}"
        if remote.sha256(image).get(image) != kernel.sha256:
            remote.upload(kernel.data, image)
        initrd = ""
        if staged.initrd is not None:
            initrd = f"{GRUB_KERNELS}/initrd-{hashlib.sha256(staged.initrd).hexdigest()[:12]}"
            remote.upload(staged.initrd, initrd)
        cmdline = staged.cmdline
        if not re.search(r"(^|\s)panic=", cmdline):
            cmdline = f"{cmdline} panic={PANIC_REBOOT}".strip()
        entry_id = f"kseries-{kernel.sha256[:12]}"
        settings_lines = {
            "KSERIES_ID": entry_id,
            "KSERIES_RELEASE": kernel.kernelrelease,
            "KSERIES_IMAGE": image,
            "KSERIES_INITRD": initrd,
            "KSERIES_CMDLINE": cmdline,
        }
        header = "".join(f"{k}={shlex.quote(v)}\n" for k, v in settings_lines.items())
        script = GRUB_SCRIPT.read_text().replace("set -e\n", f"{header}set -e\n", 1)
        remote.upload(script.encode(), GRUB_HOOK, mode="755")
        uploaded = time.monotonic()
        remote.run("update-grub", timeout=300, check=True)
        updated = time.monotonic()
        cfg = remote.run(f"cat {GRUB_CFG}", timeout=30, check=True).stdout
        entry = grub_entry(cfg, image.rsplit("/", 1)[-1])
        remote.run(f"grub-reboot {shlex.quote(entry)}", timeout=60, check=True)
        log(f"boot: grub-reboot {entry!r} (falls back to {fallback!r}); rebooting")
        remote.start("reboot", wait=machine.box.timeouts.kexec_exec)
        try:
            down = machine.wait_until_down(machine.box.timeouts.boot)
        except Unreachable as e:
            raise BootError(e.message, e.hint) from None
        return {"upload": uploaded - started, "update_grub": updated - uploaded, "shutdown": down}

    def cleanup(self, machine: Machine, log: Log) -> dict[str, float]:
        started = time.monotonic()
        remote = machine.remote()
        if not remote.run(f"command -v update-grub && test -f {GRUB_CFG}", timeout=30).ok:
            # A test kernel on an initrd of its own: its userspace has no /boot and no grub.
            # A plain reboot goes back to the saved entry, which has them.
            log("boot: this system has no update-grub; a plain reboot into the saved entry first")
            remote.start("reboot", wait=machine.box.timeouts.kexec_exec)
            machine.wait_until_down(machine.box.timeouts.boot)
            machine.wait_for_ssh(machine.box.timeouts.boot, what="SSH on the saved entry")
            remote = machine.remote()
        installed = f"[ -e {GRUB_HOOK} ] || [ -e {GRUB_KERNELS} ]"
        remove = f"rm -rf {GRUB_KERNELS} {GRUB_HOOK} && update-grub && echo removed"
        result = remote.run(
            f"if {installed}; then {remove}; fi",
            timeout=300,
            check=True,
        )
        if "removed" not in result.stdout:
            return {}
        log(f"boot: removed {GRUB_KERNELS} and {GRUB_HOOK}, update-grub done")
        return {"cleanup": time.monotonic() - started}


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
