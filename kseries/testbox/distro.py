"""A real Debian box on this machine, for the `grub-reboot` method: a bookworm disk image with
GRUB, systemd, udev, openssh-server and Debian's own kernel, booted by QEMU from its disk.

To the toolkit it is a remote box like any lab machine (host, port, identity, known_hosts, a
power_cycle command, a console log): nothing in the boot path knows it is a VM. Only the
image and the QEMU that runs it are made here.

The image is built once with mmdebstrap from the Debian archive this machine's apt sources use
(the same mirror the default tree comes from) and kept in ~/.cache/kseries/distro/. It is made
by one process at a time under a lock, beside its final name, and renamed into place whole; a
killed build leaves a scratch file the next build deletes. Boxes run on a qcow2 overlay of it,
so the image itself never changes.

Why a kseries module and not a script under ci/: the cache layout, the lock and the atomic
rename, the mirror lookup and the one door for commands are the toolkit's own (core/, paths,
tree), and the test and `invoke testbox.distro-image` both call it.

Pitfalls met building it (see ../shared/notes/): update-grub in a chroot without udev writes
root=/dev/loop0p1 unless /dev/disk/by-uuid has the root's link; `losetup -P` does not make the
partition device here without `partx -a`; Debian's GRUB_DEFAULT=0 boots whichever kernel
update-grub sorts first, so the image sets GRUB_DEFAULT=saved and saves its own kernel's entry
as the known-good default.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kseries.core.files import exclusive, remove_stale, scratch_name, write_atomic
from kseries.core.run import Popen, TimeoutExpired, run, start
from kseries.errors import ToolkitError
from kseries.paths import distro_dir
from kseries.testbox import initramfs
from kseries.testbox.boot import GRUB_KERNELS, grub_entries
from kseries.testbox.qemu import free_port
from kseries.tree import KEYRING, find_debian_mirror, read_apt_sources

Log = Callable[[str], None]
SUITE = "bookworm"
PACKAGES = (
    "linux-image-amd64", "grub-pc", "systemd", "systemd-sysv", "udev", "openssh-server",
    "iproute2",
)  # fmt: skip
DISK_SIZE = "3G"  # sparse; the installed system takes about 0.9 GB
MMDEBSTRAP_TIMEOUT = 1800.0
CHROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Docs, man pages and translations are never read on a test box.
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
GRUB_DEFAULTS = """\
# kseries test image: a failed test kernel falls back to the saved entry on the next reset
GRUB_DEFAULT=saved
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0,115200"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
"""
# QEMU's user network: the guest is 10.0.2.15 and the host's forwarded port reaches its sshd.
NETWORK = """\
[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
"""
# Timers that would start apt downloads in the middle of a boot test.
MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer")


def image_dir() -> Path:
    return distro_dir(SUITE)


@dataclass(frozen=True)
class Image:
    """The finished image and the keys it was made with."""

    disk: Path  # raw, read-only base (boxes run on overlays)
    identity: Path  # the client's private key; its public half is root's authorized key
    host_key: Path  # the box's host key (private; its .pub is what known_hosts pins)

    def host_public(self) -> str:
        return " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])

    def initramfs(self) -> Path:
        """The toolkit's test-box userspace (busybox, dropbear) with this image's keys: a test
        kernel without disk drivers (the plain test-box build) boots it from GRUB as the box's
        `initrd`, and answers with the same host key and client key as the Debian system."""
        keys = initramfs.Keys(self.disk.parent / "initramfs-keys")
        with exclusive(self.disk.parent / ".initramfs.lock"):
            keys.directory.mkdir(parents=True, exist_ok=True)
            remove_stale(keys.directory)
            if not keys.host_key.is_file():
                scratch = scratch_name(keys.host_key)
                run(["dropbearconvert", "openssh", "dropbear", self.host_key, scratch])
                os.replace(scratch, keys.host_key)
            for source, target in (
                (self.identity.with_suffix(".pub"), keys.identity.with_suffix(".pub")),
                (self.identity, keys.identity),
            ):
                if not target.is_file():
                    write_atomic(target, source.read_bytes(), mode=0o600)
            return initramfs.build(self.disk.parent / "initramfs.cpio.gz", keys)


def image(directory: Path | None = None) -> Image:
    directory = directory or image_dir()
    keys = directory / "keys"
    return Image(directory / "disk.img", keys / "id_ed25519", keys / "ssh_host_ed25519_key")


def build_image(*, mirror: str = "", directory: Path | None = None, log: Log = print) -> Image:
    """The image, built unless it is already there. Needs root (loop devices, mount, chroot)."""
    made = image(directory)
    if made.disk.is_file():
        return made
    if os.geteuid() != 0:
        raise ToolkitError(
            "building the Debian test image needs root (loop devices, mount, chroot)",
            "run it as root, or copy an image built elsewhere to " + str(made.disk),
        )
    root = made.disk.parent
    with exclusive(root / ".lock", f"distro image: waiting for another build in {root}", log):
        if made.disk.is_file():
            return made
        remove_stale(root)
        for stale in root.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _keys(made)
        started = time.monotonic()
        scratch = scratch_name(made.disk)
        work = root / f".build-{os.getpid()}"
        work.mkdir()
        try:
            _make_disk(scratch, work, made, mirror or find_debian_mirror(read_apt_sources()), log)
            os.replace(scratch, made.disk)
        finally:
            scratch.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
        size = made.disk.stat().st_blocks * 512 >> 20
        log(f"distro image: {made.disk} ({size} MiB used) in {time.monotonic() - started:.0f}s")
    return made


def _keys(made: Image) -> None:
    """The host key and the client key, each made whole once (under the image's lock)."""
    made.identity.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(made.identity.parent, 0o700)
    remove_stale(made.identity.parent)
    for key, comment in ((made.host_key, "kseries-distro-host"), (made.identity, "kseries")):
        if key.is_file():
            continue
        scratch = scratch_name(key)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", scratch])
        os.replace(f"{scratch}.pub", key.with_suffix(".pub"))
        os.replace(scratch, key)


def _make_disk(disk: Path, work: Path, made: Image, mirror: str, log: Log) -> None:
    run(["truncate", "-s", DISK_SIZE, disk])
    run(["sfdisk", "-q", disk], input="label: dos\nstart=2048, type=83, bootable\n")
    with _loop(disk) as (device, partition):
        run(["mkfs.ext4", "-q", "-L", "kseries-root", partition])
        uuid = run(["blkid", "-s", "UUID", "-o", "value", partition]).stdout.strip()
        target = work / "root"
        target.mkdir()
        with _mounted(["mount", partition, target], target):
            log(f"distro image: mmdebstrap {SUITE} from {mirror} (about 2 minutes)")
            t = time.monotonic()
            _mmdebstrap(target, mirror, work / "mmdebstrap.log")
            log(f"distro image: mmdebstrap done in {time.monotonic() - t:.0f}s")
            _configure(target, uuid, made)
            with _chroot_devices(target, device, partition, uuid):
                chroot = ["chroot", target]
                env = {"PATH": CHROOT_PATH, "LC_ALL": "C"}
                run([*chroot, "grub-install", "--target=i386-pc", device], env=env)
                run([*chroot, "update-grub"], env=env)
                cfg = (target / "boot/grub/grub.cfg").read_text()
                if f"root=UUID={uuid}" not in cfg:
                    raise ToolkitError(
                        "distro image: update-grub did not write root=UUID= for the root",
                        "see boot/grub/grub.cfg in the image; /dev/disk/by-uuid was missing?",
                    )
                run([*chroot, "grub-set-default", known_good_entry(cfg)], env=env)


def known_good_entry(grub_cfg: str) -> str:
    """The saved default the image starts with: the first Debian kernel's own entry in the
    advanced submenu (a versioned id, so a newer kernel under /boot cannot take its place)."""
    for entry, image_path in grub_entries(grub_cfg):
        if ">" in entry and "/vmlinuz-" in image_path and GRUB_KERNELS not in image_path:
            return entry
    raise ToolkitError("distro image: grub.cfg has no versioned kernel entry", "see grub.cfg")


def _mmdebstrap(target: Path, mirror: str, log_path: Path) -> None:
    sources = [
        f"deb [signed-by={KEYRING}] {mirror} {suite} main" for suite in (SUITE, f"{SUITE}-updates")
    ]
    excludes = [f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES]
    with log_path.open("ab") as out:
        run(
            [
                "mmdebstrap",
                "--variant=apt",
                f"--include={','.join(PACKAGES)}",
                "--skip=check/empty",  # the new file system's lost+found
                *excludes,
                SUITE,
                target,
                *sources,
            ],
            stdout=out,
            stderr=out,
            timeout=MMDEBSTRAP_TIMEOUT,
            what="mmdebstrap",
            hint=f"see {log_path}",
        )


def _configure(target: Path, uuid: str, made: Image) -> None:
    """What makes the root a bootable, reachable box."""

    def put(path: str, text: str, mode: int = 0o644) -> None:
        file = target / path.lstrip("/")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
        file.chmod(mode)

    put("/etc/fstab", f"UUID={uuid} / ext4 errors=remount-ro 0 1\n")
    put("/etc/hostname", "kseries-distro\n")
    put("/etc/hosts", "127.0.0.1 localhost\n127.0.1.1 kseries-distro\n")
    put("/etc/default/grub", GRUB_DEFAULTS)
    put("/etc/systemd/network/10-qemu.network", NETWORK)
    ssh = target / "etc/ssh"
    for old in ssh.glob("ssh_host_*"):
        old.unlink()
    put("/etc/ssh/ssh_host_ed25519_key", made.host_key.read_text(), 0o600)
    put("/etc/ssh/ssh_host_ed25519_key.pub", made.host_key.with_suffix(".pub").read_text())
    put("/root/.ssh/authorized_keys", made.identity.with_suffix(".pub").read_text(), 0o600)
    (target / "root/.ssh").chmod(0o700)
    env = {"PATH": CHROOT_PATH, "LC_ALL": "C"}
    run(["chroot", target, "systemctl", "enable", "systemd-networkd.service"], env=env)
    run(["chroot", target, "systemctl", "mask", *MASKED], env=env)
    run(["chroot", target, "passwd", "-d", "root"], env=env)  # console login, for debugging


@contextlib.contextmanager
def _loop(disk: Path) -> Iterator[tuple[str, str]]:
    """The image on a loop device, with its partition's device node (`losetup -P` alone does
    not make it here: `partx -a` does)."""
    device = run(["losetup", "-f", "--show", "-P", disk]).stdout.strip()
    try:
        partition = f"{device}p1"
        if not Path(partition).exists():
            run(["partx", "-a", device], check=False)
        deadline = time.monotonic() + 10
        while not Path(partition).exists():
            if time.monotonic() > deadline:
                raise ToolkitError(f"{partition} did not appear", "check loop device support")
            time.sleep(0.1)
        yield device, partition
    finally:
        run(["losetup", "-d", device], check=False)


@contextlib.contextmanager
def _mounted(command: list[str | os.PathLike[str]], point: Path) -> Iterator[None]:
    run(command)
    try:
        yield
    finally:
        run(["umount", "-R", point], check=False)


@contextlib.contextmanager
def _chroot_devices(target: Path, device: str, partition: str, uuid: str) -> Iterator[None]:
    """A private /dev for grub-install and update-grub in the chroot: the nodes they need and the
    /dev/disk/by-uuid link udev would make (without it update-grub writes root=/dev/loop0p1).
    Fresh proc and sysfs (grub-probe reads the partition's start there); the machine's own
    /dev is never touched."""
    with contextlib.ExitStack() as stack:
        for fs, name in (("proc", "proc"), ("sysfs", "sys"), ("tmpfs", "dev")):
            point = target / name
            point.mkdir(exist_ok=True)
            stack.enter_context(_mounted(["mount", "-t", fs, fs, point], point))
        dev = target / "dev"
        for name in ("null", "zero", "random", "urandom"):
            node = Path("/dev") / name
            st = node.stat()
            os.mknod(dev / name, 0o666 | (st.st_mode & 0o170000), st.st_rdev)
        for node in (device, partition):
            st = Path(node).stat()
            os.mknod(dev / Path(node).name, 0o600 | (st.st_mode & 0o170000), st.st_rdev)
        links = dev / "disk" / "by-uuid"
        links.mkdir(parents=True)
        (links / uuid).symlink_to(f"../../{Path(partition).name}")
        yield


# --- the box: QEMU booting the image from its disk --------------------------------------------


@dataclass
class DiskBox:
    """QEMU running the image on an overlay, with SSH forwarded on 127.0.0.1, the serial console
    in a file and the monitor on a unix socket (what its power_cycle command talks to)."""

    made: Image
    state: Path  # its own directory: overlay, console, monitor, known_hosts
    memory: str = "1G"
    binary: str = "qemu-system-x86_64"
    port: int = 0
    child: Popen[bytes] | None = None

    @property
    def console_log(self) -> Path:
        return self.state / "console.log"

    @property
    def monitor(self) -> Path:
        return self.state / "monitor.sock"

    @property
    def known_hosts(self) -> Path:
        return self.state / "known_hosts"

    @property
    def power_cycle(self) -> str:
        """The box's power button: a reset through the QEMU monitor."""
        return f"echo system_reset | socat - UNIX-CONNECT:{shlex.quote(str(self.monitor))}"

    def box_table(self) -> dict[str, object]:
        """The [box.NAME] table that makes this a grub-reboot box for the toolkit."""
        return {
            "method": "grub-reboot",
            "host": "127.0.0.1",
            "port": self.port,
            "user": "root",
            "identity": str(self.made.identity),
            "known_hosts": str(self.known_hosts),
            "power_cycle": self.power_cycle,
            "console_log": str(self.console_log),
        }

    def command(self, overlay: Path) -> list[str]:
        return [
            self.binary, "-name", "kseries-distro", "-accel", "tcg", "-cpu", "max",
            "-m", self.memory, "-smp", "1", "-nodefaults", "-display", "none",
            "-drive", f"file={overlay},format=qcow2,if=virtio",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            # entropy: without it sshd waited minutes for getrandom() under TCG
            "-device", "virtio-rng-pci",
            "-chardev", f"file,id=console,path={self.console_log},append=on",
            "-serial", "chardev:console",
            "-monitor", f"unix:{self.monitor},server=on,wait=off",
        ]  # fmt: skip

    def start(self) -> None:
        """A fresh overlay of the image, a free port, and QEMU started detached."""
        self.state.mkdir(parents=True, exist_ok=True)
        overlay = self.state / "overlay.qcow2"
        overlay.unlink(missing_ok=True)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", self.made.disk, overlay])
        self.port = self.port or free_port()
        write_atomic(self.known_hosts, f"[127.0.0.1]:{self.port} {self.made.host_public()}\n")
        self.monitor.unlink(missing_ok=True)
        with (self.state / "qemu.log").open("ab") as err:
            self.child = start(self.command(overlay), stdout=err, stderr=err, new_session=True)

    def running(self) -> bool:
        return self.child is not None and self.child.poll() is None

    def stop(self) -> None:
        """Stop the QEMU this object started (by its own child's pid)."""
        if self.child is None or self.child.poll() is not None:
            return
        os.kill(self.child.pid, signal.SIGTERM)
        try:
            self.child.wait(timeout=20)
        except TimeoutExpired:
            os.kill(self.child.pid, signal.SIGKILL)
            self.child.wait(timeout=20)
