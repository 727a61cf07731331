"""The terminal: one rich console, and the single place a ToolkitError becomes output."""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console

from kseries.errors import ToolkitError

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def log(message: str) -> None:
    """One progress line, dimmed, so results stand out."""
    console.print(f"[dim]{message}[/dim]", markup=True, soft_wrap=True)


# Off a terminal (CI, `| tee`) a live progress bar is disabled; this often a plain line says
# how a long step is getting on instead.
HEARTBEAT_SECONDS = 30.0


@contextmanager
def heartbeat(
    what: str, progress: Callable[[], str], out: Console | None = None
) -> Iterator[None]:
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


def edge(task: F) -> F:
    """Wrap an invoke task: a ToolkitError is printed as one line plus a hint, exit status 1."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except ToolkitError as e:
            errors.print(f"error: {e.message}", markup=False, soft_wrap=True)
            if e.hint:
                errors.print(f"hint: {e.hint}", markup=False, soft_wrap=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
