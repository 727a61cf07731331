"""A failed make run turned into one error: a missing tool, the first compiler or linker error
with its file:line and the lines around it, or make's own complaint."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from kseries.build.toolchain import INSTALL_HINT, PACKAGES, Target
from kseries.errors import ToolkitError

# kbuild's quiet-mode step lines: "  CC      kernel/fork.o", "  LD [M]  fs/foo.ko".
STEP = re.compile(r"^  ([A-Z][A-Z0-9_-]*(?: \[M\])?) +(\S+)")
# gcc's "file:line[:col]: warning: text"
WARNING = re.compile(r"^(?P<file>[^\s:][^:]*):\d+(?::\d+)?: warning: (?P<text>.+)$")
# a compile: kbuild's quiet "  CC  path" line, ninja's "[n/N] Compiling C object" (meson), or
# the selftests' full gcc command
COMPILE = re.compile(r"^  CC |^\[\d+/\d+\] Compiling |^\S*(gcc|cc|clang)\s.*\s-c\s")


def output(lines: Sequence[str]) -> tuple[tuple[str, ...], int]:
    """What a make run printed, as the check stage compares it: the warning lines, and how
    many objects it compiled."""
    warnings = tuple(line for line in lines if WARNING.match(line.strip()))
    return warnings, sum(1 for line in lines if COMPILE.match(line))


def failure(
    lines: Sequence[str],
    code: int,
    log: Path,
    tree: Path,
    build_dir: Path,
    target: Target,
    *,
    tool: str = "make",
) -> ToolkitError:
    """The error for a failed make: a missing tool, the first compiler or linker error, or
    make's own complaint; the message has file:line, the hint the exit code and the log."""
    missing = _missing_tool(lines)
    if missing:
        return missing
    tail = f"{tool} exited {code}; full log: {log}"
    for i, line in enumerate(lines):
        match = re.match(
            r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?:\d+:)? (?:fatal )?error: "
            r"(?P<msg>.*)",
            line,
        )
        if match:
            path = _shorten(match.group("file"), tree, build_dir)
            context = [c for c in lines[i + 1 : i + 4] if not STEP.match(c)]
            return BuildError(
                f"compile error at {path}:{match.group('line')}: {match.group('msg')}",
                f"fix that line; {tail}",
                file=path,
                line=int(match.group("line")),
                context=context,
                exit_code=code,
                log=log,
                printed=lines,
            )
    for i, line in enumerate(lines):
        link = re.search(r"undefined reference to|multiple definition of", line) or re.match(
            r"^\S*\bld(?:\.bfd|\.gold|\.lld)?: .*\berror\b", line
        )
        if link:
            where = re.match(r"^(?P<file>[^\s:][^:]*\.[chS]):(?P<line>\d+):", line)
            path = _shorten(where.group("file"), tree, build_dir) if where else ""
            what = line[link.start() :] if link.re.pattern.startswith("undefined") else line
            at = f" at {path}:{where.group('line')}" if where else ""
            return BuildError(
                f"link error{at}: {what.strip()}",
                f"fix the missing or duplicate symbol; {tail}",
                file=path,
                line=int(where.group("line")) if where else 0,
                context=list(lines[max(0, i - 1) : i + 2]),
                exit_code=code,
                log=log,
                printed=lines,
            )
    for line in lines:
        if "source tree is not clean" in line:
            return ToolkitError(
                f"{tree} has build output in it (make: source tree is not clean)",
                f"run `make -C {tree} mrproper`; kseries builds in a separate O= directory",
            )
        goal = re.search(r"No rule to make target '([^']+)'", line)
        if goal and goal.group(1) in target.goals:
            return ToolkitError(
                f"make has no target {goal.group(1)!r} in {tree}",
                "pass an object or directory that exists, e.g. arch/x86/kvm/mmu/mmu.o",
            )
    first = next((line for line in lines if re.search(r"\berror\b|\*\*\*", line, re.I)), "")
    return ToolkitError(f"build failed: {first.strip() or f'{tool} exited {code}'}", tail)


class BuildError(ToolkitError):
    """A compiler or linker error, with where it is and the lines around it."""

    def __init__(
        self,
        message: str,
        hint: str,
        *,
        file: str,
        line: int,
        context: list[str],
        exit_code: int,
        log: Path,
        printed: Sequence[str] = (),
    ) -> None:
        super().__init__(message, hint)
        self.file, self.line, self.context = file, line, context
        self.exit_code, self.log = exit_code, log
        # what make printed before it failed, as a finished run's Outcome keeps it
        self.warnings, self.compiled = output(printed)


def _missing_tool(lines: Sequence[str]) -> ToolkitError | None:
    """A specific error when the output says that a toolchain piece is missing."""
    checks = [
        (
            r"\b(?P<tool>flex|bison|bc|rsync|cpio|perl|openssl|gcc|ccache|distcc)"
            r"(?:: \d+)?: (?:not found|command not found)",
            None,
            None,
        ),
        (
            r"(?:gelf|libelf)\.h: No such file|please install libelf-dev",
            "libelf headers",
            "libelf-dev",
        ),
        (r"openssl/\w+\.h: No such file", "OpenSSL headers", "libssl-dev"),
        (r"(?:rsync|cpio): No such file or directory", None, None),
    ]
    for line in lines:
        for pattern, what, package in checks:
            match = re.search(pattern, line)
            if not match:
                continue
            if what is None:
                tool = match.group("tool") if "tool" in match.groupdict() else line.split(":")[0]
                what, package = tool, PACKAGES.get(tool, tool)
            return ToolkitError(
                f"{what} missing: the kernel build failed on `{line.strip()[:120]}`",
                INSTALL_HINT.format(package=package),
            )
    return None


def _shorten(path: str, tree: Path, build_dir: Path) -> str:
    """A compiler's file name relative to the tree (or the build directory, for generated
    files). gcc names it as kbuild or ccache passed it: absolute, or relative to the build
    directory (ccache's base_dir rewrites it so)."""
    full = Path(os.path.normpath(build_dir / path))
    for root in (tree, build_dir):
        if full.is_relative_to(root):
            return str(full.relative_to(root))
    return path
