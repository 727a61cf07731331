"""The test boxes' cached keys and initramfs, made by several processes at once and by one
killed halfway: every process ends with the same, whole keys, and nobody is ever prompted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kseries.paths import PROJECT
from kseries.testbox import initramfs

MAKE_KEYS = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from kseries.testbox import initramfs
    keys = initramfs.Keys(Path(sys.argv[1])).ensure()
    initramfs.build(Path(sys.argv[2]), keys)
    print(keys.host_public(), keys.client_public(), sep="|")
""")


def start(directory: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", MAKE_KEYS, str(directory), str(out)],
        cwd=PROJECT,
        stdin=subprocess.DEVNULL,  # a prompt would wait forever on a terminal; here it fails
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def check_keys(directory: Path) -> None:
    """Whole keys the real tools accept, and nothing half-made left beside them."""
    keys = initramfs.Keys(directory)
    assert keys.host_public().startswith("ssh-ed25519 ")
    public = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(keys.identity)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=True,
    ).stdout
    assert public.split()[:2] == keys.client_public().split()
    assert not list(directory.glob(".*.partial"))


@pytest.mark.parametrize("processes", [2, 3])
def test_processes_at_once_from_an_empty_directory(tmp_path: Path, processes: int) -> None:
    for round_ in range(10):
        directory = tmp_path / f"keys-{round_}"
        out = tmp_path / f"initramfs-{round_}.cpio.gz"
        children = [start(directory, out) for _ in range(processes)]
        results = [child.communicate(timeout=120) for child in children]
        for child, (_, err) in zip(children, results, strict=True):
            assert child.returncode == 0, err
        assert len({stdout for stdout, _ in results}) == 1  # everyone got the same keys
        check_keys(directory)
        assert out.is_file()
        assert not list(tmp_path.glob(".*.partial"))


def test_a_key_generation_killed_halfway_is_redone(tmp_path: Path) -> None:
    """A wrapper around the real dropbearkey (first on PATH) writes half a key at the final
    name's scratch file and stalls, so the kill lands mid-generation every time."""
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    stalled = tmp_path / "stalled"
    wrapper = wrappers / "dropbearkey"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a; do last="$a"; done\n'
        'printf "half a key" > "$last"\n'
        f": > {stalled}\n"
        "sleep 60\n"
    )
    wrapper.chmod(0o755)
    directory = tmp_path / "keys"
    env = {**os.environ, "PATH": f"{wrappers}:{os.environ['PATH']}"}
    child = start(directory, tmp_path / "initramfs.cpio.gz", env)
    deadline = time.monotonic() + 60
    while not stalled.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stalled.exists()
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    keys = initramfs.Keys(directory)
    assert not keys.host_key.exists()  # the half key never got the final name
    assert list(directory.glob(".*.partial"))
    rerun = start(directory, tmp_path / "initramfs.cpio.gz")
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    check_keys(directory)
