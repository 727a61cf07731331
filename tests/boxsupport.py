"""Fixtures for the test-box tests (this module has no tests of its own).

Real SSH servers on 127.0.0.1, started by the tests and stopped by their PID:
- OpenSSH's sshd (Debian openssh-server) with a throwaway sshd_config, host key and
  AuthorizedKeysFile. sshd insists on its privilege-separation directory /run/sshd, which this
  machine does not have; rather than create it, sshd runs in a private mount namespace
  (`unshare -m`) with a tmpfs on /run.
- dropbear (dropbear-bin), the test box's own server. It reads authorized_keys from the user's
  home, so it runs in a private mount namespace with a scratch directory bound over /root.

Faults are injected on the server side, for real: both servers run every command through a
forced command (sshd's ForceCommand, dropbear's -c) that, when its mode file says so, corrupts
an upload's bytes (`tr A B` in front of the box's `cat`) or kills the server process that
serves the session once 64 KiB of an upload have arrived (the connection really drops).
It uses absolute paths only and kills at most one process: the nearest sshd or dropbear above it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kseries import build
from kseries.config import Config
from kseries.paths import cache_dir
from kseries.testbox.qemu import free_port

WRAPPER = """#!/bin/sh
# kseries SSH tests: run the client's command, or break uploads as {dir}/mode says.
dir={dir}
mode=$(/usr/bin/head -n1 "$dir/mode" 2>/dev/null)
case "$SSH_ORIGINAL_COMMAND" in
  *"cat > "*".part"*) ;;
  *) exec /bin/sh -c "$SSH_ORIGINAL_COMMAND" ;;
esac
case "$mode" in
  corrupt)
    /usr/bin/tr A B | /bin/sh -c "$SSH_ORIGINAL_COMMAND"
    exit $? ;;
  drop-once|drop-always)
    if [ "$mode" = drop-once ] && [ -e "$dir/dropped" ]; then
      exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
    fi
    /usr/bin/touch "$dir/dropped"
    /usr/bin/head -c 65536 > /dev/null
    pid=$$
    for step in 1 2 3 4 5; do
      pid=$(/usr/bin/cut -d' ' -f4 /proc/$pid/stat)
      comm=$(/usr/bin/head -n1 /proc/$pid/comm)
      case "$comm" in sshd|dropbear) kill -9 "$pid"; exit 1 ;; esac
    done
    exit 1 ;;
  *) exec /bin/sh -c "$SSH_ORIGINAL_COMMAND" ;;
esac
"""


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def keygen(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kseries-test", "-f", str(path)],
        check=True,
    )
    return path


def public(path: Path) -> str:
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@dataclass
class Server:
    """A running SSH server: where it listens, the keys, the known_hosts line to trust it."""

    kind: str
    port: int
    directory: Path
    host_public: str  # "ssh-ed25519 AAAA..."
    identity: Path
    process: subprocess.Popen[bytes]

    def known_hosts(self, path: Path, key: str | None = None) -> Path:
        path.write_text(f"[127.0.0.1]:{self.port} {key or self.host_public}\n")
        return path

    def mode(self, value: str) -> None:
        (self.directory / "mode").write_text(value + "\n")
        (self.directory / "dropped").unlink(missing_ok=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _need(*programs: str) -> None:
    missing = [p for p in programs if not shutil.which(p) and not Path(p).exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run bash ci/install.sh")


def start_sshd(directory: Path, identity: Path) -> Server:
    _need("/usr/sbin/sshd", "unshare", "ssh-keygen")
    directory.mkdir(parents=True, exist_ok=True)
    host_key = keygen(directory / "host_key")
    (directory / "authorized_keys").write_text(public(identity) + "\n")
    wrapper = directory / "force"
    wrapper.write_text(WRAPPER.format(dir=directory))
    wrapper.chmod(0o755)
    port = free_port()
    (directory / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n"
        f"ForceCommand {wrapper}\n"
    )
    script = (
        "mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && "
        f"exec /usr/sbin/sshd -D -e -f {directory / 'sshd_config'}"
    )
    process = _serve(script, directory / "sshd.log", port)
    return Server("openssh", port, directory, public(host_key), identity, process)


def start_dropbear(directory: Path, identity: Path) -> Server:
    _need("/usr/sbin/dropbear", "dropbearkey", "unshare")
    directory.mkdir(parents=True, exist_ok=True)
    home = directory / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    (home / ".ssh").chmod(0o700)
    (home / ".ssh" / "authorized_keys").write_text(public(identity) + "\n")
    (home / ".ssh" / "authorized_keys").chmod(0o600)
    host_key = directory / "host_key.dropbear"
    subprocess.run(
        ["dropbearkey", "-t", "ed25519", "-f", str(host_key)], check=True, capture_output=True
    )
    out = subprocess.run(
        ["dropbearkey", "-y", "-f", str(host_key)], check=True, capture_output=True, text=True
    ).stdout
    host_public = " ".join(next(x for x in out.splitlines() if x.startswith("ssh-")).split()[:2])
    wrapper = directory / "force"
    wrapper.write_text(WRAPPER.format(dir=directory))
    wrapper.chmod(0o755)
    port = free_port()
    script = (
        f"mount --bind {home} /root && exec /usr/sbin/dropbear -F -E -s -g -c {wrapper} "
        f"-p 127.0.0.1:{port} -r {host_key} -P {directory / 'dropbear.pid'}"
    )
    process = _serve(script, directory / "dropbear.log", port)
    return Server("dropbear", port, directory, host_public, identity, process)


def _serve(script: str, log: Path, port: int) -> subprocess.Popen:
    """Run a server's shell script in a private mount namespace; return once it listens."""
    process = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    wait_port(port)
    return process


class BlackHole:
    """A TCP listener that accepts connections and never says a word (a hung box's sshd)."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = self.socket.getsockname()[1]

    def close(self) -> None:
        self.socket.close()


def build_series_kernel(config: Config, clone: Path) -> Path:
    """The series kernel of `series_clone`, built by the build stage into the build directory
    kept beside it (incremental on later runs); its manifest. The tests that boot it on
    boxes with their own configs (a box's state under tmp) share it so."""
    started = time.monotonic()
    manifest = build.build(
        config,
        tree=str(clone),
        out=str(cache_dir() / "ci-series" / "build" / "linux"),
        set_last=False,
        log=lambda _: None,
    )
    print(f"series kernel built in {time.monotonic() - started:.0f}s")
    return Path(manifest.path)
