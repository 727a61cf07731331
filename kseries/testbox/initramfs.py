"""The local test box's userspace: a gzip'd cpio built from the host's Debian packages.

busybox-static gives the shell and the applets (busybox init is PID 1), dropbear-bin the SSH
server and kexec-tools `kexec`; the last two are dynamic, so the libraries `ldd` lists are copied
to the same paths. The box's SSH host key is generated once and kept next to the image, so the
client pins it; the client's public key is the only authorized key.

The archive is written by a small `newc` writer here (not the cpio command), so it needs no root
for /dev/console or root-owned files, and it is reproducible: same inputs, same bytes, and a
digest of the inputs decides whether it is rebuilt.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from kseries.core.files import exclusive, remove_stale, scratch_name, write_atomic
from kseries.core.run import INSTALL_HINT, PACKAGES, run
from kseries.errors import ToolkitError

BUSYBOX = "/bin/busybox"
# Host programs copied into the box (their packages: kseries.core.run.PACKAGES).
PROGRAMS = ("/usr/sbin/dropbear", "/usr/sbin/kexec")
HOST_KEY = "/etc/dropbear/host_key_ed25519"
FORMAT_VERSION = 3  # bump when the layout below changes, so cached images are rebuilt

RC = """\
#!/bin/sh
# kseries test box: mounts, network (QEMU user net), then busybox init starts dropbear.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname kseries-box
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
kvm=no; [ -c /dev/kvm ] && kvm=yes
echo "kseries-box: userspace up, boot_id $(cat /proc/sys/kernel/random/boot_id), kvm=$kvm"
"""

INITTAB = f"""\
::sysinit:/etc/rc
::respawn:/usr/sbin/dropbear -F -E -s -g -p 22 -P /run/dropbear.pid -r {HOST_KEY}
"""


@dataclass
class Archive:
    """A newc cpio being assembled in memory: directories, files, symlinks, device nodes."""

    entries: dict[str, tuple[int, bytes, int]] = field(default_factory=dict)  # mode, data, rdev

    def directory(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            name = "/".join(parts[:i])
            if name and name not in self.entries:
                self.entries[name] = (stat.S_IFDIR | (mode if i == len(parts) else 0o755), b"", 0)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(os.path.dirname(path.strip("/")))
        self.entries[path.strip("/")] = (stat.S_IFREG | mode, data, 0)

    def symlink(self, path: str, target: str) -> None:
        self.directory(os.path.dirname(path.strip("/")))
        self.entries[path.strip("/")] = (stat.S_IFLNK | 0o777, target.encode(), 0)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.directory(os.path.dirname(path.strip("/")))
        self.entries[path.strip("/")] = (stat.S_IFCHR | mode, b"", os.makedev(major, minor))

    def copy(self, host_path: str, mode: int | None = None) -> None:
        """A host file at the same path (symlinks followed), keeping its permission bits."""
        real = Path(host_path).resolve()
        self.file(host_path, real.read_bytes(), mode or stat.S_IMODE(real.stat().st_mode))

    def cpio(self) -> bytes:
        out = io.BytesIO()
        for ino, name in enumerate(sorted(self.entries), start=1):
            mode, data, rdev = self.entries[name]
            _entry(out, name, mode, data, ino, rdev)
        _entry(out, "TRAILER!!!", 0, b"", 0, 0)
        return out.getvalue()


def _entry(out: io.BytesIO, name: str, mode: int, data: bytes, ino: int, rdev: int) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev))
    header = "070701" + "".join(f"{v:08x}" for v in fields) + f"{len(encoded):08x}{0:08x}"
    out.write(header.encode() + encoded)
    out.write(b"\0" * (-(110 + len(encoded)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def require(path: str) -> None:
    if not Path(path).exists():
        package = PACKAGES[Path(path).name]
        raise ToolkitError(f"{path} is missing", INSTALL_HINT.format(package=package))


def libraries(program: str) -> list[str]:
    """The shared libraries (and the ELF interpreter) `ldd` lists for a host program."""
    done = run(["ldd", program], hint="check the program")
    found = re.findall(r"=>\s*(/\S+)|^\s*(/\S+)\s+\(", done.stdout, re.MULTILINE)
    return sorted({a or b for a, b in found})


@dataclass(frozen=True)
class Keys:
    """The box's host key (dropbear format, private) and the client's key pair (OpenSSH)."""

    directory: Path

    @property
    def host_key(self) -> Path:
        return self.directory / "host_key_ed25519.dropbear"

    @property
    def identity(self) -> Path:
        return self.directory / "id_ed25519"

    def ensure(self) -> Keys:
        """Generate whatever is missing, once; existing keys are never replaced.

        Boxes start in parallel from one key directory: each key is made by one process at a
        time under a lock, into a fresh scratch name, and renamed into place whole, so no
        generator ever finds a half-written key or asks to overwrite one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        if self.host_key.is_file() and self.identity.is_file():
            return self
        with exclusive(self.directory / ".lock"):
            remove_stale(self.directory)
            if not self.host_key.is_file():
                require("/usr/bin/dropbearkey")
                scratch = scratch_name(self.host_key)
                run(["dropbearkey", "-t", "ed25519", "-f", scratch])
                os.replace(scratch, self.host_key)
            if not self.identity.is_file():
                require("/usr/bin/ssh-keygen")
                scratch = scratch_name(self.identity)
                comment = "kseries-testbox"
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", scratch])
                os.replace(f"{scratch}.pub", self.identity.with_suffix(".pub"))
                os.replace(scratch, self.identity)
        return self

    def host_public(self) -> str:
        """The host key's public half, "ssh-ed25519 AAAA…" (for known_hosts)."""
        out = run(["dropbearkey", "-y", "-f", self.host_key]).stdout
        line = next(x for x in out.splitlines() if x.startswith("ssh-"))
        return " ".join(line.split()[:2])

    def client_public(self) -> str:
        return " ".join(self.identity.with_suffix(".pub").read_text().split()[:2])


def build(out: Path, keys: Keys, *, rc: str = RC, inittab: str = INITTAB) -> Path:
    """Write the gzip'd cpio to `out` unless it already holds these inputs; return `out`.

    `rc` and `inittab` are replaceable so tests can build a box that panics or never answers.
    """
    for program in (BUSYBOX, *PROGRAMS):
        require(program)
    keys.ensure()
    archive = Archive()
    for name in ("proc", "sys", "dev", "tmp", "run", "root", "var/log", "etc/dropbear"):
        archive.directory(name)
    archive.directory("root", 0o700)
    archive.directory("root/.ssh", 0o700)
    archive.directory("tmp", 0o1777)
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3, 0o666)
    archive.copy(BUSYBOX, 0o755)
    applets = run([BUSYBOX, "--list-full"]).stdout.split()
    for applet in applets:
        if applet != BUSYBOX.lstrip("/"):
            archive.symlink(applet, BUSYBOX)
    archive.symlink("init", BUSYBOX)
    for program in PROGRAMS:
        archive.copy(program, 0o755)
        for library in libraries(program):
            archive.copy(library, 0o755)
    archive.file("etc/rc", rc.encode(), 0o755)
    archive.file("etc/inittab", inittab.encode())
    archive.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    archive.file("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o600)
    archive.file("etc/group", b"root:x:0:\n")
    archive.file("etc/shells", b"/bin/sh\n/bin/ash\n")
    archive.file(HOST_KEY, keys.host_key.read_bytes(), 0o600)
    archive.file("root/.ssh/authorized_keys", (keys.client_public() + "\n").encode(), 0o600)
    data = archive.cpio()
    digest = hashlib.sha256(f"v{FORMAT_VERSION}\0".encode() + data).hexdigest()
    stamp = out.with_name(out.name + ".inputs")
    if out.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return out
    with exclusive(out.with_name(f".{out.name}.lock")):
        write_atomic(out, gzip.compress(data, compresslevel=1, mtime=0))
        write_atomic(stamp, digest + "\n")
    return out
