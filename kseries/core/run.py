"""The one door for running commands.

Every external program the toolkit starts goes through here, so every one of them gets the
same treatment: stdin closed (a tool that would prompt fails instead of hanging on a question
nobody sees), a missing program named with the Debian package that has it, and a failure
turned into a ToolkitError with the command, its exit status and the tail of its stderr.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kseries.errors import ToolkitError

PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT
DEVNULL = subprocess.DEVNULL
Popen = subprocess.Popen
TimeoutExpired = subprocess.TimeoutExpired

# The Debian package behind each program the stages run (`invoke doctor` checks them all).
PACKAGES = {
    "git": "git",
    "git-send-email": "git-email",
    "perl": "perl",
    "python3": "python3",
    "python": "python3",  # the toolkit's venv interpreter (made by ci/install.sh from python3)
    "gcc": "gcc",
    "make": "make",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "cpio": "cpio",
    "rsync": "rsync",
    "ccache": "ccache",
    "distcc": "distcc",
    "xz": "xz-utils",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "ldd": "libc-bin",
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "dropbear": "dropbear-bin",
    "dropbearkey": "dropbear-bin",
    "dropbearconvert": "dropbear-bin",
    "kexec": "kexec-tools",
    "ssh-keygen": "openssh-client",
    "ssh": "openssh-client",
    "sshd": "openssh-server",
    "mmdebstrap": "mmdebstrap",
    "qemu-img": "qemu-utils",  # the Debian box's overlays
    "sfdisk": "fdisk",  # the Debian box's image
    "socat": "socat",  # the Debian box's power button (its QEMU monitor)
    "public-inbox-init": "public-inbox",  # the review loop's tests: a real list archive
    "public-inbox-mda": "public-inbox",
    "public-inbox-httpd": "public-inbox",
    "dpkg-source": "dpkg-dev",  # the QEMU series' default tree: Debian's source package
    "ninja": "ninja-build",  # the QEMU series' build
    "pkg-config": "pkgconf",
    # Not programs: what they load, by the name it is loaded by.
    "perl:Mail::Address": "libmailtools-perl",  # git send-email (only a Recommends of git-email)
    "python3:ply": "python3-ply",  # checkpatch.pl's SPDX check
    "python3:git": "python3-git",
    "gelf.h": "libelf-dev",  # objtool
    "openssl/opensslv.h": "libssl-dev",  # sign-file, extract-cert
    # the static QEMU's libraries, by their pkg-config names
    "pc:glib-2.0": "libglib2.0-dev",
    "pc:libpcre2-8": "libpcre2-dev",
    "pc:zlib": "zlib1g-dev",
    "pc:mount": "libmount-dev",
    "pc:blkid": "libblkid-dev",
    "pc:libselinux": "libselinux1-dev",
    "pc:libsepol": "libsepol-dev",
}
INSTALL_HINT = "run `bash ci/install.sh` (or `apt-get install {package}`)"

Stream = int | IO[Any] | None


@dataclass(frozen=True)
class Ran:
    """What a finished command left: its status and, when captured, its output."""

    argv: tuple[str, ...]
    status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == 0


class CommandFailed(ToolkitError):
    """A command exited non-zero; `status` and `stderr` stay available to callers that care."""

    def __init__(self, ran: Ran, what: str, hint: str) -> None:
        lines = [line.strip() for line in (ran.stderr or ran.stdout).splitlines() if line.strip()]
        tail = "; ".join(lines[-3:]) or "no output"
        super().__init__(f"{what} failed (exit {ran.status}): {tail}", hint)
        self.ran = ran


class CommandTimedOut(ToolkitError):
    """A command ran past its timeout and was killed."""


def describe(argv: Sequence[str | os.PathLike[str]], words: int = 3) -> str:
    """The first words of a command line, for messages: `git am -3`, `ssh-keygen -q -t`."""
    parts = [os.fspath(a) for a in argv]
    shown = shlex.join([Path(parts[0]).name, *parts[1:words]])
    return shown + (" ..." if len(parts) > words else "")


def missing(program: str | os.PathLike[str]) -> ToolkitError:
    """The error for a program that is not installed, naming the package that has it."""
    name = Path(program).name
    package = PACKAGES.get(name, name)
    return ToolkitError(f"{name} is not installed", INSTALL_HINT.format(package=package))


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    input: str | bytes | None = None,
    stdout: Stream = PIPE,
    stderr: Stream = PIPE,
    timeout: float | None = None,
    check: bool = True,
    text: bool = True,
    what: str = "",
    hint: str = "run the same command by hand to see its whole output",
) -> Ran:
    """Run `argv` to the end. With `check` (the default) a non-zero exit raises CommandFailed;
    without it the caller reads `status`. `env` replaces the environment, as in subprocess."""
    argv = [os.fspath(a) for a in argv]
    what = what or describe(argv)
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            input=input,
            stdin=None if input is not None else DEVNULL,
            stdout=stdout,
            stderr=stderr,
            timeout=timeout,
            text=text,
            errors="replace" if text else None,
            check=False,
        )
    except (FileNotFoundError, PermissionError) as e:
        raise _not_started(e, argv, cwd) from e
    except subprocess.TimeoutExpired as e:
        raise CommandTimedOut(
            f"{what} did not finish in {timeout:g} s and was stopped", "run it by hand to see why"
        ) from e
    ran = Ran(tuple(argv), done.returncode, _text(done.stdout), _text(done.stderr))
    if check and not ran.ok:
        raise CommandFailed(ran, what, hint)
    return ran


def start(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    stdin: Stream = DEVNULL,
    stdout: Stream = PIPE,
    stderr: Stream = PIPE,
    text: bool = False,
    new_session: bool = False,
) -> subprocess.Popen[Any]:
    """Start `argv` in the background (a make run, a QEMU box, a background git question).
    stdin is closed unless the caller asks for a pipe."""
    argv = [os.fspath(a) for a in argv]
    try:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=text,
            errors="replace" if text else None,
            start_new_session=new_session,
        )
    except (FileNotFoundError, PermissionError) as e:
        raise _not_started(e, argv, cwd) from e


def _not_started(e: OSError, argv: list[str], cwd: str | os.PathLike[str] | None) -> ToolkitError:
    """Why a program did not start: its directory is missing (the same exception), it is not
    installed, or it cannot be executed."""
    if cwd is not None and not Path(cwd).is_dir():
        return ToolkitError(f"{describe(argv)}: directory {cwd} does not exist", "check the path")
    if isinstance(e, PermissionError):
        return ToolkitError(f"{describe(argv)}: {argv[0]} is not executable", "check its mode")
    return missing(argv[0])


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else value.decode(errors="replace")
