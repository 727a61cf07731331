"""The terminal: one rich console, and the single place a ToolkitError becomes output."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console

from kseries.errors import ToolkitError


def _width(stream: Any) -> int | None:
    """Off a terminal (a CI log, `| tee`) rich would fold every table and long line at 80
    columns; logs are read in wide windows. $COLUMNS still wins."""
    return None if stream.isatty() or "COLUMNS" in os.environ else 160


console = Console(highlight=False, width=_width(sys.stdout))
errors = Console(stderr=True, highlight=False, width=_width(sys.stderr))

F = TypeVar("F", bound=Callable[..., Any])


def log(message: str) -> None:
    """One progress line, dimmed, so results stand out."""
    console.print(f"[dim]{message}[/dim]", markup=True, soft_wrap=True)


# Off a terminal (CI, `| tee`) a live progress bar is disabled; this often a plain line says
# how a long step is getting on instead.
HEARTBEAT_SECONDS = 30.0


@contextmanager
def heartbeat(what: str, progress: Callable[[], str], out: Console | None = None) -> Iterator[None]:
    """While the block runs off a terminal, print `what: <progress()>, <elapsed>` every
    HEARTBEAT_SECONDS, so a long step never looks hung in a log. On a terminal: nothing (the
    caller's live display is there)."""
    out = out or console
    if out.is_terminal:
        yield
        return
    started = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            elapsed = int(time.monotonic() - started)
            detail = progress()
            out.print(
                f"{what}: {detail + ', ' if detail else ''}{elapsed // 60}m{elapsed % 60:02d}s",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    thread = threading.Thread(target=beat, name=f"heartbeat {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


N = TypeVar("N", int, float)


def number(option: str, value: str | N, kind: type[N], minimum: N) -> N:
    """A numeric option's value. The tasks take numbers as strings and parse them here:
    invoke's own conversion ends `--duration abc` in a ValueError traceback."""
    try:
        parsed = kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ToolkitError(
            f"--{option} {value}: not {what}", f"e.g. --{option} {minimum or 10}"
        ) from None
    if parsed < minimum:
        raise ToolkitError(
            f"--{option} {value}: must be at least {minimum}", f"e.g. --{option} {minimum}"
        )
    return parsed


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI job's timeout, `kill`, systemd) ends a task as Ctrl-C does: LAVA jobs
    canceled, make and local boxes stopped, a rebase's tree put back; by default it would kill
    the process at once and leave all of that behind. Only the main thread takes signals:
    elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def edge(task: F) -> F:
    """Wrap an invoke task: a ToolkitError is printed as one line plus a hint, exit status 1.

    So is an OSError (a read-only tree or output directory, a full disk, a path that is a
    file): the user can fix those, so they get the path and the reason, not a traceback.
    SIGTERM interrupts the task as Ctrl-C does."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with terminate_as_interrupt():
                return task(*args, **kwargs)
        except ToolkitError as e:
            fail(e.message, e.hint)
        except OSError as e:
            if e.filename is None:
                raise
            path = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
            fail(
                f"{path}: {e.strerror or e}",
                "check that the path is right and writable (permissions, a read-only mount, "
                "free space)",
            )

    return wrapper  # type: ignore[return-value]


def fail(message: str, hint: str) -> None:
    errors.print(f"error: {message}", markup=False, soft_wrap=True)
    if hint:
        errors.print(f"hint: {hint}", markup=False, soft_wrap=True)
    sys.exit(1)


def confirm(question: str) -> bool:
    """Ask on the terminal; only "y" is a yes, and so end of input (Ctrl-D) is a no."""
    try:
        return input(question).strip().lower() == "y"
    except EOFError:
        return False
