"""SSH to a test box: Fabric's Connection with strict host-key checking, commands on exec
channels with timeouts, and uploads through `cat > file` checked with sha256 on the box.

Fabric 3.2.3 sets paramiko's AutoAddPolicy on every Connection, which silently trusts any host
key, a changed one included. `Remote.connect` replaces it before opening: the box's own
known_hosts is loaded and an unknown key is refused (`--trust-new-host` records it instead); a
changed key is always refused. No ~/.ssh/config, agent or default key is consulted: the box's
identity file is the only key offered, and neither keys nor passphrases are ever logged.

Dropbear (the QEMU box) has no SFTP subsystem, so uploads stream the bytes into `cat` on an
exec channel, and the box computes the sha256 of what it wrote in the same command.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import select
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko
from fabric import Config as FabricConfig
from fabric import Connection

from kseries.errors import ToolkitError
from kseries.testbox.box import Box

Log = Callable[[str], None]
# paramiko logs failed attempts (no banner yet while a box boots) as ERROR tracebacks; with no
# handler configured they would reach the terminal through logging's last resort.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class HostKeyError(ToolkitError):
    """The box's host key is unknown or differs from the pinned one."""


class Unreachable(ToolkitError):
    """No SSH session could be opened (refused, timed out, no banner, dropped)."""


class ConnectionLost(Unreachable):
    """An open session died under a command or an upload."""


class CommandTimeout(ToolkitError):
    """A command on the box ran past its timeout; its output so far is kept."""

    def __init__(self, message: str, hint: str, stdout: str, stderr: str) -> None:
        super().__init__(message, hint)
        self.stdout = stdout
        self.stderr = stderr


class UploadError(ToolkitError):
    """An upload did not arrive intact after its retries."""


class ChecksumMismatch(UploadError):
    """The box holds different bytes than were sent."""


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: SHA256:base64 without padding."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_key_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _Strict(paramiko.MissingHostKeyPolicy):
    """Refuse an unknown host key, or, when trusting new hosts, record it in known_hosts."""

    def __init__(self, known_hosts: Path, trust_new: bool, log: Log) -> None:
        self.known_hosts = known_hosts
        self.trust_new = trust_new
        self.log = log

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey):
        if not self.trust_new:
            raise HostKeyError(
                f"host key of {hostname} is not in {self.known_hosts} "
                f"(the box offers {key.get_name()} {fingerprint(key)})",
                "check the fingerprint on the box's console, then run again with "
                "--trust-new-host to record it",
            )
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with self.known_hosts.open("a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.log(f"ssh: trusted new host key of {hostname}: {key.get_name()} {fingerprint(key)}")


class Remote:
    """One SSH session to a box. `run` and `upload` reconnect after the box rebooted."""

    def __init__(
        self,
        box: Box,
        *,
        port: int | None = None,
        trust_new_host: bool = False,
        log: Log = lambda _: None,
    ) -> None:
        self.box = box
        self.port = port or box.port
        self.trust_new_host = trust_new_host
        self.log = log
        self.connection: Connection | None = None

    @property
    def address(self) -> str:
        return self.box.address(self.port)

    # --- connecting ------------------------------------------------------------------------

    def connect(self, timeout: float | None = None, banner_timeout: float | None = None) -> Remote:
        """Open the session (one attempt). Raises HostKeyError, Unreachable or ToolkitError.

        `banner_timeout` bounds the wait for the server's first line: short while a box boots,
        because QEMU's port forward accepts the TCP connection before the guest listens."""
        self.close()
        box = self.box
        if box.known_hosts is None or box.identity is None:
            raise ToolkitError(f"box {box.name}: no known_hosts or identity", "see its config")
        timeout = timeout or box.timeouts.connect
        banner_timeout = min(banner_timeout or timeout, timeout)
        config = FabricConfig(ssh_config=paramiko.SSHConfig(), lazy=True)
        connection = Connection(
            box.host,
            user=box.user,
            port=self.port,
            config=config,
            connect_timeout=max(1, int(timeout)),
            connect_kwargs={
                "key_filename": [str(box.identity)],
                "look_for_keys": False,
                "allow_agent": False,
                "banner_timeout": banner_timeout,
                "auth_timeout": timeout,
            },
        )
        # The security-relevant part: Fabric installed AutoAddPolicy; replace it.
        connection.client.set_missing_host_key_policy(
            _Strict(box.known_hosts, self.trust_new_host, self.log)
        )
        if box.known_hosts.is_file():
            try:
                connection.client.load_host_keys(str(box.known_hosts))
            except (paramiko.hostkeys.InvalidHostKey, ValueError) as e:
                raise HostKeyError(
                    f"box {box.name}: {box.known_hosts} has an invalid line: {e}",
                    "fix or remove that line (ssh-keygen -R)",
                ) from None
        elif not self.trust_new_host:
            raise HostKeyError(
                f"box {box.name}: known_hosts file {box.known_hosts} does not exist",
                "create it (ssh-keyscan, checked against the box's console) or run with "
                "--trust-new-host",
            )
        try:
            connection.open()
        except paramiko.BadHostKeyException as e:
            name = host_key_name(box.host, self.port)
            connection.close()
            raise HostKeyError(
                f"host key of {name} CHANGED: {box.known_hosts} pins {fingerprint(e.expected_key)}"
                f", the box offers {e.key.get_name()} {fingerprint(e.key)}; refusing to connect",
                "if the box was reinstalled on purpose, remove the old entry with "
                f"`ssh-keygen -f {box.known_hosts} -R '{name}'` and run with --trust-new-host",
            ) from None
        except HostKeyError:
            connection.close()
            raise
        except paramiko.AuthenticationException as e:
            connection.close()
            raise ToolkitError(
                f"{self.address}: authentication failed with identity {box.identity} ({e})",
                "put the identity's public key in the box's authorized_keys",
            ) from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            connection.close()
            raise Unreachable(f"cannot connect to {self.address}: {_reason(e)}", _HINT) from None
        self.connection = connection
        return self

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def _transport(self) -> paramiko.Transport:
        if self.connection is None or not self.connection.is_connected:
            self.connect()
        assert self.connection is not None
        transport = self.connection.client.get_transport()
        assert transport is not None
        return transport

    # --- commands --------------------------------------------------------------------------

    def run(
        self,
        command: str,
        *,
        timeout: float,
        stdin: bytes | None = None,
        check: bool = False,
    ) -> CommandResult:
        """Run `command` on an exec channel; raise CommandTimeout after `timeout` seconds and
        ConnectionLost if the session dies. With `check`, a non-zero exit is a ToolkitError."""
        started = time.monotonic()
        deadline = started + timeout
        try:
            channel = self._transport().open_session(timeout=min(timeout, 30))
            channel.exec_command(command)
            if stdin is not None:
                channel.settimeout(max(0.1, deadline - time.monotonic()))
                channel.sendall(stdin)
            channel.shutdown_write()
        except TimeoutError:
            self.close()
            raise CommandTimeout(
                f"{self.address}: `{_short(command)}` timed out sending its input",
                _HINT,
                "",
                "",
            ) from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            self.close()
            raise ConnectionLost(f"{self.address}: connection lost: {_reason(e)}", _HINT) from None
        out, err = bytearray(), bytearray()
        try:
            while True:
                if channel.recv_ready():
                    out += channel.recv(1 << 16)
                    continue
                if channel.recv_stderr_ready():
                    err += channel.recv_stderr(1 << 16)
                    continue
                # The exit status can come before the last stderr bytes (sshd reads the two
                # pipes on its own schedule): done only once the server's EOF says no more.
                if (
                    channel.exit_status_ready()
                    and channel.eof_received
                    and not (channel.recv_ready() or channel.recv_stderr_ready())
                ):
                    break
                if channel.closed or not channel.get_transport().is_active():
                    raise ConnectionLost(
                        f"{self.address}: connection lost during `{_short(command)}`", _HINT
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    channel.close()
                    raise CommandTimeout(
                        f"{self.address}: `{_short(command)}` still running after {timeout:g}s",
                        "raise the timeout in configs/testboxes.toml if it is just slow",
                        out.decode(errors="replace"),
                        err.decode(errors="replace"),
                    )
                select.select([channel], [], [], min(remaining, 0.5))
            status = channel.recv_exit_status()
            if status == -1:  # the channel closed without an exit status: the session died
                raise ConnectionLost(
                    f"{self.address}: connection lost during `{_short(command)}` (no exit status)",
                    _HINT,
                )
        except (paramiko.SSHException, OSError, EOFError) as e:
            self.close()
            raise ConnectionLost(f"{self.address}: connection lost: {_reason(e)}", _HINT) from None
        finally:
            channel.close()
        result = CommandResult(
            command,
            status,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            time.monotonic() - started,
        )
        if check and not result.ok:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ToolkitError(
                f"{self.address}: `{_short(command)}` failed (exit {status})"
                + (f": {detail[-1]}" if detail else ""),
                "see the command's output above",
            )
        return result

    def start(self, command: str, *, wait: float) -> CommandResult | None:
        """Run a command that is expected not to come back (`kexec -e`, `reboot`): in the
        foreground of an exec channel, for at most `wait` seconds. None if it did not return
        (or the connection dropped), which is what a reboot looks like; its CommandResult if it did,
        which means it failed."""
        try:
            return self.run(command, timeout=wait)
        except (CommandTimeout, ConnectionLost):
            self.close()
            return None

    # --- files -----------------------------------------------------------------------------

    def sha256(self, *paths: str, timeout: float = 60) -> dict[str, str]:
        """The sha256 of each path that exists on the box."""
        quoted = " ".join(shlex.quote(p) for p in paths)
        result = self.run(f"sha256sum {quoted} 2>/dev/null", timeout=timeout)
        sums = {}
        for line in result.stdout.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2:
                sums[parts[1].strip()] = parts[0]
        return sums

    def upload(
        self,
        data: bytes,
        path: str,
        *,
        mode: str = "644",
        attempts: int = 3,
        timeout: float = 120,
    ) -> str:
        """Write `data` to `path` on the box through `cat`, atomically (a .part file renamed
        once the box's own sha256 of it matches). Retries a dropped connection or a mismatch;
        raises UploadError / ChecksumMismatch after `attempts`. Returns the sha256."""
        expected = hashlib.sha256(data).hexdigest()
        part = f"{path}.part"
        quoted, quoted_part = shlex.quote(path), shlex.quote(part)
        directory = shlex.quote(str(Path(path).parent))
        command = (
            f"mkdir -p {directory} && cat > {quoted_part} && set -- $(sha256sum {quoted_part}) "
            f'&& if [ "$1" = {expected} ]; then chmod {mode} {quoted_part} && '
            f"mv -f {quoted_part} {quoted} && echo ok $1; "
            f"else echo mismatch $1; rm -f {quoted_part}; exit 3; fi"
        )
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                result = self.run(command, timeout=timeout, stdin=data)
            except (ConnectionLost, Unreachable, CommandTimeout) as e:
                last = e.message
                self.log(f"ssh: upload of {path} attempt {attempt}/{attempts}: {last}")
                self._reconnect_for_retry(attempt)
                continue
            words = result.stdout.split()
            if result.ok and words[:2] == ["ok", expected]:
                return expected
            if words[:1] == ["mismatch"]:
                got = words[1] if len(words) > 1 else "?"
                last = f"sha256 on the box is {got}, sent {expected}"
                self.log(f"ssh: upload of {path} attempt {attempt}/{attempts}: {last}")
                if attempt == attempts:
                    raise ChecksumMismatch(
                        f"{self.address}: upload of {path} arrived corrupted {attempts} times "
                        f"({last})",
                        "check the box's disk and memory, and the network path to it",
                    )
                continue
            last = (result.stderr or result.stdout).strip() or f"exit {result.exit_status}"
            raise UploadError(f"{self.address}: upload of {path} failed: {last}", _SPACE_HINT)
        raise UploadError(
            f"{self.address}: upload of {path} failed {attempts} times: {last}",
            "the connection keeps dropping; check the box and the network",
        )

    def _reconnect_for_retry(self, attempt: int) -> None:
        self.close()
        time.sleep(min(0.5 * attempt, 2.0))
        with contextlib.suppress(Unreachable):  # the next attempt reports it
            self.connect()


_HINT = "check that the box is up and its sshd answers (invoke testbox.status for the local box)"
_SPACE_HINT = "check free space in the box's upload directory (workdir)"


def _reason(e: BaseException) -> str:
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        return "connection refused"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    text = (str(e) or type(e).__name__).splitlines()[0]
    if "banner" in text or "No existing session" in text:
        return "no SSH banner: the port accepts connections but no sshd answers (timed out)"
    return text


def _short(command: str) -> str:
    return command if len(command) <= 60 else command[:57] + "..."
