"""Off a terminal (CI, `| tee`), a long make run says how far it is every so often instead of
printing nothing until it ends."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from kseries import ui
from kseries.build import MakeRun, Target

MAKEFILE = """\
all:
\t@for n in 1 2 3 4 5 6; do echo "  CC      obj$$n.o"; sleep 0.3; done
"""


def test_a_make_run_off_a_terminal_prints_plain_progress_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ui, "HEARTBEAT_SECONDS", 0.5)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "Makefile").write_text(MAKEFILE)
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    with (tmp_path / "build.log").open("w") as log:
        outcome = MakeRun(
            tree,
            tmp_path / "out",
            Target("all", ("all",)),
            jobs=1,
            log_file=log,
            console=console,
            expected=6,
        ).run()
    assert len(outcome.steps) == 6
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2, lines
    assert all(line.startswith("make all: ") for line in lines)
    assert any(" of about 6 steps, 0m0" in line for line in lines)
    assert "\x1b" not in out.getvalue()  # plain text, no live-display escapes


def test_on_a_terminal_the_live_display_is_left_alone() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True)
    with ui.heartbeat("make all", lambda: "1 steps", console):
        pass
    assert out.getvalue() == ""
