"""The terminal: one rich console, and the single place a ToolkitError becomes output."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console

from kseries.errors import ToolkitError

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def log(message: str) -> None:
    """One progress line, dimmed, so results stand out."""
    console.print(f"[dim]{message}[/dim]", markup=True)


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


def confirm(question: str) -> bool:
    """Ask on the terminal; only "y" is a yes, and so end of input (Ctrl-D) is a no."""
    try:
        return input(question).strip().lower() == "y"
    except EOFError:
        return False
