"""The SSH layer against real servers on 127.0.0.1: OpenSSH's sshd and dropbear (the box's).

Nothing is mocked. Faults (a dropped connection, corrupted bytes) are injected by the server's
forced command; see boxsupport.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import paramiko
import pytest
from fabric import Connection

from kseries.config import Config
from kseries.testbox import session
from kseries.testbox.box import Box, Timeouts
from kseries.testbox.ssh import (
    ChecksumMismatch,
    CommandTimeout,
    HostKeyError,
    Remote,
    Unreachable,
    UploadError,
)
from tests.boxsupport import (
    BlackHole,
    Server,
    free_port,
    keygen,
    start_dropbear,
    start_sshd,
)

PAYLOAD = os.urandom(1 << 20) + b"A" * 4096  # 1 MiB + some A's for the corrupting server


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return keygen(tmp_path_factory.mktemp("client") / "id_ed25519")


@pytest.fixture(scope="module", params=["openssh", "dropbear"])
def server(
    request: pytest.FixtureRequest, identity: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    start = start_sshd if request.param == "openssh" else start_dropbear
    running = start(tmp_path_factory.mktemp(request.param), identity)
    yield running
    running.stop()


@pytest.fixture
def box(server: Server, tmp_path: Path) -> Box:
    server.mode("normal")
    return Box(
        name=f"{server.kind}-box",
        method="kexec",
        host="127.0.0.1",
        port=server.port,
        identity=server.identity,
        known_hosts=server.known_hosts(tmp_path / "known_hosts"),
        workdir=str(tmp_path / "box"),
        timeouts=Timeouts(connect=5, boot=10, test=30),
    )


def test_run_keeps_output_and_exit_status(box: Box) -> None:
    remote = Remote(box).connect()
    result = remote.run("echo out; echo err >&2; exit 3", timeout=20)
    assert (result.stdout, result.stderr, result.exit_status) == ("out\n", "err\n", 3)
    remote.close()


def test_upload_verifies_sha256_on_the_box(box: Box) -> None:
    remote = Remote(box).connect()
    target = f"{box.workdir}/blob"
    sha = remote.upload(PAYLOAD, target)
    assert Path(target).read_bytes() == PAYLOAD
    assert remote.sha256(target) == {target: sha}
    assert not Path(target + ".part").exists()
    remote.close()


def test_changed_host_key_is_refused(box: Box, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host_key")
    pinned = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    known = tmp_path / "known_hosts_other"
    known.write_text(f"[127.0.0.1]:{box.port} {pinned}\n")
    for trust in (False, True):  # --trust-new-host never overrides a changed key
        with pytest.raises(HostKeyError, match="CHANGED") as error:
            Remote(replace(box, known_hosts=known), trust_new_host=trust).connect()
        assert "ssh-keygen -f" in error.value.hint
    assert known.read_text() == f"[127.0.0.1]:{box.port} {pinned}\n"


def test_unknown_host_is_refused_unless_trusted(box: Box, tmp_path: Path) -> None:
    known = tmp_path / "empty_known_hosts"
    known.write_text("")
    unknown = replace(box, known_hosts=known)
    with pytest.raises(HostKeyError, match="not in") as error:
        Remote(unknown).connect()
    assert "--trust-new-host" in error.value.hint
    logged: list[str] = []
    Remote(unknown, trust_new_host=True, log=logged.append).connect().close()
    assert known.read_text().split()[1:] == box.known_hosts.read_text().split()[1:]
    assert "trusted new host key" in logged[0]
    Remote(unknown).connect().close()  # now pinned: strict mode accepts it


def test_fabric_alone_would_accept_any_key(box: Box, tmp_path: Path) -> None:
    """The trap this layer exists for: Fabric's default AutoAddPolicy takes an unknown key."""
    connection = Connection(
        "127.0.0.1",
        user="root",
        port=box.port,
        connect_kwargs={"key_filename": [str(box.identity)], "look_for_keys": False},
    )
    assert isinstance(connection.client._policy, paramiko.AutoAddPolicy)
    connection.open()
    assert connection.is_connected
    connection.close()


def test_connection_refused(box: Box) -> None:
    with pytest.raises(Unreachable, match="connection refused"):
        Remote(replace(box, port=free_port())).connect()


def test_dropped_connection_during_upload_is_retried(box: Box, server: Server) -> None:
    server.mode("drop-once")
    logged: list[str] = []
    remote = Remote(box, log=logged.append).connect()
    target = f"{box.workdir}/retried"
    remote.upload(PAYLOAD, target)
    assert (server.directory / "dropped").exists()  # the server really dropped it once
    assert Path(target).read_bytes() == PAYLOAD
    assert "attempt 1/3" in logged[0] and "connection lost" in logged[0]
    remote.close()


def test_connection_dropping_every_time_is_reported(box: Box, server: Server) -> None:
    server.mode("drop-always")
    remote = Remote(box).connect()
    with pytest.raises(UploadError, match="failed 2 times"):
        remote.upload(PAYLOAD, f"{box.workdir}/never", attempts=2)
    assert not Path(f"{box.workdir}/never").exists()
    remote.close()


def test_checksum_mismatch_is_caught(box: Box, server: Server) -> None:
    server.mode("corrupt")
    remote = Remote(box).connect()
    target = f"{box.workdir}/corrupted"
    with pytest.raises(ChecksumMismatch, match="arrived corrupted 2 times"):
        remote.upload(PAYLOAD, target, attempts=2)
    assert not Path(target).exists() and not Path(target + ".part").exists()
    remote.close()


def test_command_timeout_keeps_partial_output(box: Box) -> None:
    remote = Remote(box).connect()
    with pytest.raises(CommandTimeout) as error:
        remote.run("echo started; sleep 30", timeout=1.5)
    assert error.value.stdout == "started\n"
    remote.close()


def test_keys_never_appear_in_logs(
    box: Box, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logged: list[str] = []
    known = tmp_path / "kh"
    known.write_text("")
    remote = Remote(replace(box, known_hosts=known), trust_new_host=True, log=logged.append)
    remote.connect()
    remote.run("true", timeout=20)
    remote.close()
    secret = "".join(box.identity.read_text().splitlines()[1:-1])
    text = caplog.text + "\n".join(logged)
    assert secret[:40] not in text and secret[-40:] not in text
    assert "PRIVATE KEY" not in text


def test_box_that_never_answers_times_out_and_is_power_cycled(tmp_path: Path) -> None:
    """A box whose sshd accepts but never speaks: the run ends in a timeout, the power-cycle
    command (a script recording that it ran) runs, and the verdict says so."""
    hole = BlackHole()
    marker = tmp_path / "power-cycled"
    script = tmp_path / "power-cycle.sh"
    script.write_text(f'#!/bin/sh\necho "$KSERIES_BOX" >> {marker}\n')
    script.chmod(0o755)
    identity = keygen(tmp_path / "id")
    known = tmp_path / "kh"
    pinned = " ".join(keygen(tmp_path / "host").with_suffix(".pub").read_text().split()[:2])
    known.write_text(f"[127.0.0.1]:{hole.port} {pinned}\n")
    box = Box(
        name="mute",
        method="kexec",
        port=hole.port,
        identity=identity,
        known_hosts=known,
        power_cycle=str(script),
        timeouts=Timeouts(connect=1, boot=3, test=10),
    )
    kernel_image = tmp_path / "bzImage"
    kernel_image.write_bytes(_fake_bzimage())
    run = session.BoxSession(box, log=lambda _: None).run(
        session.Subject("kernel", _kernel(kernel_image)), [], tmp_path / "out"
    )
    hole.close()
    assert run.verdict == "unreachable"
    assert "no SSH after" in run.reason and "timed out" in run.reason
    assert marker.read_text() == "mute\n"
    assert run.recovery.startswith("FAILED") and "exit 0" in run.recovery


def _fake_bzimage() -> bytes:
    """Just enough of a bzImage for kernel.load: the setup header and a version string."""
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    data[0x400:0x440] = b"7.2.13+ (u@h) #9 SMP PREEMPT Thu Jan  1 00:00:00 UTC 2026\0".ljust(
        64, b"\0"
    )
    return bytes(data)


def _kernel(path: Path):
    from kseries.testbox import kernel

    return kernel.load(str(path))


def test_unknown_box_names_the_choices(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "series.toml").write_text("")
    (configs / "testboxes.toml").write_text('[box.a]\nmethod = "qemu"\nqemu = {}\n')
    from kseries.errors import ToolkitError
    from kseries.testbox.box import TestboxConfig

    with pytest.raises(ToolkitError, match="no test box 'b'") as error:
        TestboxConfig.load(Config.load(configs)).box("b")
    assert "boxes: a" in error.value.hint


def test_a_tests_files_go_once_and_fill_its_args(box: Box, tmp_path: Path) -> None:
    """Two tests taking the same file: it is uploaded once, named by its content, and each
    test's {NAME} becomes its path on the box; the run's kernel fills "kernel" files."""
    from kseries.testbox import runner, suite

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "series.toml").write_text("")
    (tmp_path / "data.txt").write_text("shared bytes\n")
    (tmp_path / "show").write_text('#!/bin/sh\ncat "$@"\n')
    (tmp_path / "configs" / "testboxes.toml").write_text(
        "".join(
            f'[[test]]\nname = "{name}"\nbinary = "../show"\nargs = ["{{data}}", "{{kernel}}"]\n'
            'files = { data = "file:../data.txt", kernel = "kernel" }\n'
            for name in ("one", "two")
        )
    )
    from kseries.testbox.box import TestboxConfig

    specs = suite.load_tests(TestboxConfig.load(Config.load(tmp_path / "configs")))
    built = [suite.Builder(None).build(s).with_kernel(b"the kernel\n") for s in specs]
    logged: list[str] = []
    remote = Remote(box).connect()
    results = runner.run_tests(
        remote,
        built,
        workdir=box.workdir,
        default_timeout=20,
        env={},
        box_vars={},
        where="box",
        log=logged.append,
    )
    remote.close()
    assert [(r.name, r.status, r.stdout) for r in results] == [
        (name, "pass", "shared bytes\nthe kernel\n") for name in ("one", "two")
    ]
    # the program (the same bytes under two names), data and kernel: each file once
    assert len([line for line in logged if "uploaded" in line]) == 4
    assert sorted(p.name[:5] for p in Path(box.workdir, "files").iterdir()) == ["data-", "kerne"]
