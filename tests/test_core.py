"""The one door for commands and the atomic files: what every stage relies on."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kseries.core import files
from kseries.core.run import CommandFailed, CommandTimedOut, run, start
from kseries.errors import ToolkitError


def test_a_missing_program_is_named_with_its_package(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError) as raised:
        run(["dropbearkey", "-h"], env={"PATH": str(tmp_path)})
    assert raised.value.message == "dropbearkey is not installed"
    assert "apt-get install dropbear-bin" in raised.value.hint


def test_stdin_is_closed_so_a_prompt_cannot_hang() -> None:
    # `read` on a terminal or an open pipe would wait; on a closed stdin it sees EOF at once
    done = run(["sh", "-c", "read answer; echo status=$?"], timeout=10)
    assert done.stdout.strip() == "status=1"
    child = start(["sh", "-c", "read answer; echo status=$?"], text=True)
    out, _ = child.communicate(timeout=10)
    assert out.strip() == "status=1"


def test_a_failure_names_the_command_its_status_and_stderr_tail() -> None:
    with pytest.raises(CommandFailed) as raised:
        run(["sh", "-c", "echo one >&2; echo two >&2; echo three >&2; echo four >&2; exit 3"])
    message = raised.value.message
    assert message.startswith("sh -c 'echo one >&2;")
    assert message.endswith("failed (exit 3): two; three; four")
    assert raised.value.ran.status == 3
    assert not run(["false"], check=False).ok


def test_a_timeout_is_an_error_not_a_hang() -> None:
    with pytest.raises(CommandTimedOut) as raised:
        run(["sleep", "30"], timeout=0.2)
    assert "did not finish in 0.2 s" in raised.value.message


def test_a_missing_directory_and_a_file_that_is_not_a_program(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match=r"directory .* does not exist"):
        run(["true"], cwd=tmp_path / "nowhere")
    script = tmp_path / "script"
    script.write_text("echo hi\n")
    with pytest.raises(ToolkitError, match="is not executable"):
        run([script])


def test_write_atomic_leaves_the_old_file_or_the_new_never_half(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    files.write_atomic(target, "old\n")
    seen: set[str] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(target.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(200):
        files.write_atomic(target, "new " * 5000 + "\n")
        files.write_atomic(target, "old\n")
    stop.set()
    reader.join()
    assert seen <= {"old\n", "new " * 5000 + "\n"}
    assert not list(tmp_path.glob(".*.partial"))


def test_try_exclusive_is_refused_while_another_holder_has_it(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with files.try_exclusive(lock) as first:
        assert first
        pid = os.fork()
        if pid == 0:  # another process: the lock is per open file, as for two tasks
            with files.try_exclusive(lock) as second:
                os._exit(0 if not second else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with files.try_exclusive(lock) as again:
        assert again


def test_write_atomic_keeps_the_mode_of_what_it_replaces(tmp_path: Path) -> None:
    fresh, kept, private = tmp_path / "fresh", tmp_path / "kept", tmp_path / "private"
    kept.write_text("x")
    kept.chmod(0o664)
    files.write_atomic(fresh, "a")
    files.write_atomic(kept, "b")
    files.write_atomic(private, "c", mode=0o600)
    assert [p.stat().st_mode & 0o777 for p in (fresh, kept, private)] == [0o644, 0o664, 0o600]
