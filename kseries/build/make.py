"""One make run in the build directory (`O=`): driven through kbuild's own quiet-mode lines
(`  CC      path`) into a progress bar, logged in full to a file, and turned into a one-line
error with the first compiler or linker error on failure. A meson build kind runs ninja the
same way, its `[N/M]` lines giving the exact total."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from kseries.build.failure import STEP, failure
from kseries.build.failure import output as printed_by
from kseries.build.toolchain import Target, _env
from kseries.core import run as door
from kseries.ui import heartbeat

# ninja's status lines: "[812/1379] Compiling C object libcommon.a.p/hw_vfio_pci.c.o".
NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\] (\S+(?: \S+)*?) (\S+)$")


@dataclass(frozen=True)
class Outcome:
    """A finished make run: what it did, and the warnings it printed, as the check stage
    compares them."""

    steps: tuple[tuple[str, str], ...]  # ("CC", "arch/x86/kvm/mmu/mmu.o"), in order
    seconds: float
    log: Path
    warnings: tuple[str, ...] = ()  # the lines, as printed
    compiled: int = 0  # objects compiled (kbuild's CC steps, or gcc -c commands)


class MakeRun:
    """Run make in the build directory, show progress, log everything, explain failures."""

    def __init__(
        self,
        tree: Path,
        build_dir: Path,
        target: Target,
        *,
        jobs: int,
        make_vars: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_file: IO[str],
        verbose: bool = False,
        console: Console | None = None,
        expected: int = 0,
        tool: str = "make",
    ) -> None:
        self.tool = tool  # "make" (kbuild, O=) or "ninja" (a configured meson build directory)
        self.tree = tree
        self.build_dir = build_dir
        self.target = target
        self.jobs = jobs
        self.make_vars = list(make_vars)
        self.env = dict(env or {})
        self.log_file = log_file
        self.verbose = verbose
        self.console = console or Console(highlight=False)
        self.expected = expected

    def command(self) -> list[str]:
        if self.tool == "ninja":
            return ["ninja", "-C", str(self.build_dir), f"-j{self.jobs}", *self.target.goals]
        return [
            "make",
            "-C",
            str(self.tree),
            f"O={self.build_dir}",
            f"-j{self.jobs}",
            "--no-print-directory",
            *self.make_vars,
            *self.target.variables,
            *self.target.goals,
        ]

    def run(self) -> Outcome:
        cmd = self.command()
        self.log_file.write(f"$ {' '.join(cmd)}\n")
        self.log_file.flush()
        started = time.monotonic()
        steps: list[tuple[str, str]] = []
        output: list[str] = []
        process = door.start(cmd, cwd=self.tree, env=_env(self.env), text=True, stderr=door.STDOUT)
        assert process.stdout is not None
        try:
            with self._display() as show:
                for line in process.stdout:
                    self.log_file.write(line)
                    line = line.rstrip("\n")
                    step = self._step(line)
                    if step:
                        steps.append(step)
                    output.append(line)
                    show(line, bool(step), len(steps))
        except BaseException:  # Ctrl-C: make has the signal too; do not leave it running
            process.terminate()
            process.wait()
            raise
        code = process.wait()
        self.log_file.flush()
        seconds = time.monotonic() - started
        if code != 0:
            raise failure(
                output,
                code,
                Path(self.log_file.name),
                self.tree,
                self.build_dir,
                self.target,
                tool=self.tool,
            )
        return Outcome(tuple(steps), seconds, Path(self.log_file.name), *printed_by(output))

    def _step(self, line: str) -> tuple[str, str] | None:
        """(kind, path) of a step line; ninja's also sets the total, which it knows exactly."""
        if self.tool != "ninja":
            step = STEP.match(line)
            return (step.group(1), step.group(2)) if step else None
        ninja = NINJA_STEP.match(line)
        if not ninja:
            return None
        self.expected = int(ninja.group(2))
        return ninja.group(3), ninja.group(4)

    @contextmanager
    def _display(self) -> Iterator[Callable[[str, bool, int], None]]:
        if self.verbose:
            yield lambda line, _step, _count: self.console.print(
                line, markup=False, highlight=False
            )
            return
        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
        exact = self.tool == "ninja"  # each line says how many steps there are in all
        if self.expected or exact:
            columns += [BarColumn(), MofNCompleteColumn()]
        else:
            columns += [TextColumn("{task.completed} steps")]
        columns += [TimeElapsedColumn(), TextColumn("[dim]{task.fields[last]}")]
        # Off a terminal (CI logs, pipes) a live bar only leaves blank lines behind: a plain
        # line every half minute says how far make is instead.
        quiet = not self.console.is_terminal
        what = f"{self.tool} {' '.join(self.target.goals)}"
        done = [0]

        def so_far() -> str:
            of = f" of {'' if exact else 'about '}{self.expected}" if self.expected else ""
            return f"{done[0]}{of} steps"

        with (
            Progress(*columns, console=self.console, transient=True, disable=quiet) as progress,
            heartbeat(what, so_far, self.console),
        ):
            task = progress.add_task(what, total=self.expected or None, last="")

            def show(line: str, step: bool, count: int) -> None:
                if step:
                    done[0] = count
                    total = max(self.expected, count + 1) if self.expected else None
                    if exact:
                        total = self.expected
                    progress.update(task, completed=count, total=total, last=line.strip()[:60])

            yield show
