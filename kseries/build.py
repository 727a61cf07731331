"""Build a kernel from a base config plus configs/ fragments: incremental, with progress, a log,
a failure summary and a manifest that says exactly which kernel was built.

Three concepts, tuxmake-style:

- `BuildConfig`: the base config (tinyconfig, defconfig or a .config file) and the fragments,
  merged with the tree's own `scripts/kconfig/merge_config.sh` and `make olddefconfig`, then
  checked: every option a fragment asked for must have survived, or the error names the
  option and the Kconfig dependency that dropped it.
- `Build`: one `make` run in the build directory (`O=`), driven through its own quiet-mode
  lines (`  CC      path`) into a progress bar, logged in full to a file, and turned into a
  one-line error with the first compiler or linker error on failure.
- `Manifest`: the JSON record written next to the kernel image (tree, branch, commit, kernel
  release, utsversion, image and config sha256, fragments, wall time, ccache hit rate).

`build()` composes them; `invoke build` calls it. The build directory defaults to
~/.cache/kseries/build/<tree-key>/ and is kept between runs, so a rebuild is incremental. The
toolkit's own files live in its `kseries/` subdirectory (log, step counts, config stamp);
~/.cache/kseries/build/last.json points at the newest kernel image for the test-box stage.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
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

from kseries import tree as tree_stage
from kseries.config import BOOLEAN, INTEGER, STRING, STRING_TABLE, STRINGS, Config, Keys, Names
from kseries.core import run as door
from kseries.core.files import exclusive, output_dir
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.paths import cache_dir
from kseries.ui import heartbeat

Log = Callable[[str], None]

BASES = ("tinyconfig", "defconfig")
INSTALL_HINT = "run `bash ci/install.sh` (or `apt-get install {package}`)"
# Tools every kernel build runs, and the Debian package that has each.
TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc"}
PACKAGES = {
    **TOOLS,
    "rsync": "rsync",
    "cpio": "cpio",
    "perl": "perl",
    "openssl": "openssl",
    "ccache": "ccache",
    "distcc": "distcc",
}
# Targets when configs/ has no [build.targets] table (it normally has).
DEFAULT_TARGETS: dict[str, dict[str, Any]] = {
    "bzImage": {"goals": ["bzImage"], "artifact": "arch/x86/boot/bzImage"},
}
# configs/toolkit.toml [build]: the defaults of `invoke build`, and what each --target makes.
BUILD = Keys(
    {
        "base_config": STRING,
        "fragments": STRINGS,
        "target": STRING,
        "jobs": INTEGER,
        "ccache": BOOLEAN,
        "distcc_hosts": STRING,
        "targets": Names(
            Keys(
                {"goals": STRINGS, "variables": STRING_TABLE, "needs": STRINGS, "artifact": STRING}
            )
        ),
    }
)
# A raw make goal the user may name with --target: one object or a directory of the tree.
RAW_GOAL = re.compile(r"^[\w./+-]+(?:\.(?:o|i|s|lst|ko)|/)$")
# kbuild's quiet-mode step lines: "  CC      kernel/fork.o", "  LD [M]  fs/foo.ko".
STEP = re.compile(r"^  ([A-Z][A-Z0-9_-]*(?: \[M\])?) +(\S+)")
IMAGE = "arch/x86/boot/bzImage"
DISTCC_SLOTS = 4  # distcc's default per-host job limit (2 for localhost)
STATE_VERSION = 1


# --- fragments and the base config -------------------------------------------------------------


@dataclass(frozen=True)
class Fragment:
    """A config fragment: the options it asks for, and the line of each (for messages)."""

    name: str
    path: Path
    options: dict[str, str]  # "CONFIG_KVM" -> "y", "m", '"text"', "123", or "n" (is not set)
    lines: dict[str, int]

    @classmethod
    def load(cls, ref: str, directory: Path) -> Fragment:
        """`ref` is a name in `directory` (kvm-testbox or kvm-testbox.config) or a file path."""
        path = _fragment_path(ref, directory)
        options: dict[str, str] = {}
        lines: dict[str, int] = {}
        for number, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
            line = raw.strip()
            unset = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
            setting = re.fullmatch(r"(CONFIG_\w+)=(.*)", line)
            if unset:
                options[unset.group(1)], lines[unset.group(1)] = "n", number
            elif setting:
                options[setting.group(1)], lines[setting.group(1)] = setting.group(2), number
            elif line and not line.startswith("#"):
                raise ToolkitError(
                    f"{path}:{number}: not a config line: {line!r}",
                    "write CONFIG_NAME=value or `# CONFIG_NAME is not set`",
                )
        name = path.name.removesuffix(".config") if path.parent == directory else str(path)
        return cls(name, path, options, lines)

    def where(self, option: str) -> str:
        return f"{self.path}:{self.lines[option]}"


def _fragment_path(ref: str, directory: Path) -> Path:
    if "/" in ref:
        path = Path(ref).expanduser().resolve()
        if path.is_file():
            return path
        raise ToolkitError(f"config fragment {ref}: no such file", "pass an existing file")
    path = directory / (ref if ref.endswith(".config") else f"{ref}.config")
    if path.is_file():
        return path
    known = sorted(p.stem for p in directory.glob("*.config"))
    raise ToolkitError(
        f"config fragment {ref!r}: no {path}",
        f"fragments in {directory}: {', '.join(known) or 'none'}",
    )


def read_config(path: Path) -> dict[str, str]:
    """A .config as {"CONFIG_X": value}; unset options are absent."""
    values = {}
    for line in path.read_text(errors="replace").splitlines():
        match = re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip())
        if match:
            values[match.group(1)] = match.group(2)
    return values


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class BuildConfig:
    """The base config plus the fragments: written to BUILD/.config, then checked."""

    def __init__(self, base: str, fragments: Sequence[Fragment], arch: str = "") -> None:
        self.base = base
        self.fragments = tuple(fragments)
        self.arch = arch  # make's ARCH; empty: the host's

    @classmethod
    def resolve(
        cls, base: str, refs: Sequence[str], directory: Path, arch: str = ""
    ) -> BuildConfig:
        """Check the base and load the fragments, before any tree or make is touched."""
        if base not in BASES:
            path = Path(base).expanduser()
            if not path.is_file():
                raise ToolkitError(
                    f"base config {base!r} is neither {' nor '.join(BASES)} nor a file",
                    "pass --base-config tinyconfig, defconfig or the path of a .config",
                )
            try:
                text = path.read_text(errors="replace")
            except OSError as e:
                raise ToolkitError(f"base config {path}: {e.strerror}", "check the file") from e
            if not re.search(r"^(CONFIG_\w+=|# CONFIG_\w+ is not set)", text, re.MULTILINE):
                raise ToolkitError(
                    f"base config {path} has no CONFIG_ lines: it is not a kernel .config",
                    "pass a .config written by the kernel's make *config",
                )
            base = str(path.resolve())
        return cls(base, [Fragment.load(ref, directory) for ref in refs], arch)

    def requested(self) -> dict[str, tuple[str, Fragment]]:
        """Every option the fragments ask for, with the fragment that has the last word."""
        wanted: dict[str, tuple[str, Fragment]] = {}
        for fragment in self.fragments:
            for option, value in fragment.options.items():
                wanted[option] = (value, fragment)
        return wanted

    def digest(self) -> str:
        """Changes whenever the inputs do: base (name or content) and each fragment's text."""
        arch = f"ARCH={self.arch}\0" if self.arch else ""
        h = hashlib.sha256(f"v{STATE_VERSION}\0{self.base}\0{arch}".encode())
        if self.base not in BASES:
            h.update(Path(self.base).read_bytes())
        for fragment in self.fragments:
            h.update(f"\0{fragment.path}\0".encode() + fragment.path.read_bytes())
        return h.hexdigest()

    def prepare(
        self,
        tree: Path,
        build_dir: Path,
        make_vars: Sequence[str],
        output: IO[str],
        state: dict[str, Any],
        log: Log,
    ) -> bool:
        """Write BUILD/.config unless it already is what these inputs give; True if written.

        Skipping matters: rewriting .config costs seconds and makes kbuild re-sync its config.
        """
        dot_config = build_dir / ".config"
        stamp = state.get("config", {})
        if (
            stamp.get("inputs") == self.digest()
            and dot_config.is_file()
            and stamp.get("sha256") == sha256_file(dot_config)
        ):
            self.verify(tree, dot_config)
            return False
        names = ", ".join(f.name for f in self.fragments) or "no fragments"
        log(f"build: configuring {Path(self.base).name} + {names}")

        def kconfig(*args: str) -> None:
            _run_kconfig([*args], tree, output)

        make = ["make", "-C", str(tree), f"O={build_dir}", *make_vars]
        if self.base in BASES:
            kconfig(*make, self.base)
        else:
            shutil.copyfile(self.base, dot_config)
        if self.fragments:
            kconfig(
                str(tree / "scripts/kconfig/merge_config.sh"),
                "-m",
                "-O",
                str(build_dir),
                str(dot_config),
                *(str(f.path) for f in self.fragments),
            )
        kconfig(*make, "olddefconfig")
        self.verify(tree, dot_config)
        state["config"] = {"inputs": self.digest(), "sha256": sha256_file(dot_config)}
        return True

    def verify(self, tree: Path, dot_config: Path) -> None:
        """Fail, naming the option and its unmet dependency, if Kconfig dropped a request."""
        final = read_config(dot_config)
        dropped = {}
        for option, (value, fragment) in self.requested().items():
            got = final.get(option, "n")
            if got != value and not (value == "n" and option not in final):
                dropped[option] = (value, got, fragment)
        if not dropped:
            return
        index = KconfigIndex(tree)
        reasons = {opt: index.why(opt[7:], want, final) for opt, (want, _, _) in dropped.items()}
        # Name a root cause: an option whose unmet dependencies are not themselves dropped.
        names = {opt[7:] for opt in dropped}
        option = next((o for o in dropped if not reasons[o].symbols & names), next(iter(dropped)))
        want, got, fragment = dropped[option]
        reason = reasons[option]
        shown = "not set" if got == "n" else got
        others = [o for o in dropped if o != option]
        hint = reason.hint
        if others:
            hint += f"; also dropped: {', '.join(others)}"
        asked, did = f"{option}={want}", "dropped it"
        if want == "n":
            asked, did = f"`# {option} is not set`", "kept it on"
        raise ToolkitError(
            f"{fragment.where(option)} asks for {asked}, but Kconfig {did} "
            f"(final .config: {shown}): {reason.text}",
            hint,
        )


def _run_kconfig(cmd: Sequence[str], tree: Path, output: IO[str]) -> None:
    output.write(f"$ {' '.join(cmd)}\n")
    output.flush()
    done = door.run(cmd, cwd=tree, env=_env(), stderr=door.STDOUT, check=False)
    output.write(done.stdout)
    output.flush()
    if done.ok:
        return
    lines = done.stdout.splitlines()
    missing = _missing_tool(lines)
    if missing:
        raise missing
    # Kconfig names its own errors "FILE:LINE: what"; else make's or the script's complaint.
    first = next((line for line in lines if re.match(r"[\w./-]+:\d+: ", line)), None)
    first = first or next((line for line in lines if re.search(r"\berror\b", line, re.I)), None)
    first = first or (lines[-1] if lines else f"exit {done.status}")
    first = first.replace(f"{tree}/", "")
    step = Path(cmd[0]).name if cmd[0] != "make" else f"make {cmd[-1]}"
    raise ToolkitError(
        f"Kconfig failed in {step} (exit {done.returncode}): {first.strip()}",
        f"the whole output is in {output.name}; a Kconfig syntax error names its file:line",
    )


# --- why Kconfig dropped an option ---------------------------------------------------------------


@dataclass
class _Condition:
    expr: str
    where: str  # "arch/x86/kvm/Kconfig:19"
    kind: str  # "if", "depends on", "menu depends on", "prompt if", ...


@dataclass
class _Definition:
    name: str
    where: str
    conditions: list[_Condition]
    prompt: bool = False
    choice: list[str] | None = None  # the members of the enclosing choice


@dataclass
class _Block:
    kind: str
    conditions: list[_Condition] = field(default_factory=list)
    members: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reason:
    """Why an option is not what was asked: a sentence, a hint, the symbols it names."""

    text: str
    hint: str
    symbols: frozenset[str] = frozenset()


class KconfigIndex:
    """Where each symbol is defined in the tree's Kconfig, under which conditions (its own
    `depends on`, the enclosing `if`, menu and choice), and what selects it.

    A small reader of the Kconfig language, walked from the top-level Kconfig through `source`
    like Kconfig itself does, for x86. Only used to explain a dropped option.
    """

    def __init__(self, tree: Path, srcarch: str = "x86") -> None:
        self.tree = tree
        self.srcarch = srcarch
        self.definitions: dict[str, list[_Definition]] = {}
        self.selectors: dict[str, list[str]] = {}
        self._read(tree / "Kconfig", [], depth=0)

    def why(self, symbol: str, want: str, final: Mapping[str, str]) -> Reason:
        definitions = self.definitions.get(symbol)
        if not definitions:
            return Reason(
                f"there is no config {symbol} in this tree's Kconfig",
                "check the spelling, or whether the option was renamed or removed",
            )
        values = {k[7:]: v for k, v in final.items()}
        if want == "n":
            on = sorted({s for s in self.selectors.get(symbol, []) if values.get(s) in ("y", "m")})
            return Reason(
                f"selected by {', '.join(on)}" if on else "it cannot be turned off in this config",
                "turn those off too, or drop the line" if on else "drop the line",
                frozenset(on),
            )
        need = {"y": 2, "m": 1}.get(want, 1)
        unmet = [[c for c in d.conditions if _evaluate(c.expr, values) < need] for d in definitions]
        if all(unmet):  # no definition of the symbol is visible: that is why it was dropped
            first, rest = unmet[0][0], unmet[0][1:]
            symbols = _symbols(first.expr)
            state = ", ".join(f"{s}={values.get(s, 'n')}" for s in sorted(symbols))
            text = (
                f"unmet dependency {first.expr} ({state}; "
                f"`{first.kind} {first.expr}` at {first.where})"
            )
            if rest:
                text += "; also " + ", ".join(c.expr for c in rest)
            all_symbols = frozenset(s for c in unmet[0] for s in _symbols(c.expr))
            if len(symbols) == 1 and values.get(next(iter(symbols)), "n") == "n":
                hint = f"add CONFIG_{next(iter(symbols))}=y to the fragment"
            else:
                hint = f"set the options so that `{first.expr}` holds"
            return Reason(text, hint, all_symbols)
        if want == "m" and values.get("MODULES", "n") != "y":
            return Reason(
                "=m needs CONFIG_MODULES, which is off",
                "use =y, or add CONFIG_MODULES=y",
                frozenset({"MODULES"}),
            )
        if not any(d.prompt for d in definitions):
            selectors = sorted(set(self.selectors.get(symbol, [])))
            return Reason(
                f"{symbol} has no prompt; only a select sets it "
                f"({', '.join(selectors[:6]) or 'nothing selects it'})",
                "ask for an option that selects it instead",
                frozenset(selectors),
            )
        choice = next((d.choice for d in definitions if d.choice), None)
        if choice:
            picked = [m for m in choice if values.get(m) == "y"]
            return Reason(
                f"{symbol} is one of a choice ({', '.join(choice)}) and the final .config picked "
                f"{', '.join(picked) or 'another'}",
                f"also set `# CONFIG_{picked[0]} is not set`" if picked else "see the choice",
                frozenset(picked),
            )
        where = definitions[0].where
        return Reason(
            f"its dependencies hold, so a select or range overrode it (see {where})",
            f"inspect it with `make O=BUILD menuconfig`, then search for {symbol}",
        )

    # The reader. Kconfig is line-oriented: a keyword opens an entry, `depends on` attaches to
    # the entry above, `if`/`menu`/`choice` nest, help text is indented prose to skip.

    def _read(self, path: Path, stack: list[_Block], depth: int) -> None:
        if depth > 40 or not path.is_file():
            return
        rel = path.relative_to(self.tree)
        entry: _Definition | _Block | None = None
        help_indent: int | None = None
        in_help = False
        for number, raw in _logical_lines(path):
            if in_help:
                expanded = raw.expandtabs()
                if not expanded.strip():
                    continue
                indent = len(expanded) - len(expanded.lstrip())
                if help_indent is None:
                    help_indent = indent
                if indent >= help_indent and indent > 0:
                    continue
                in_help = False
            line = _strip_comment(raw).strip()
            if not line:
                continue
            word, _, rest = line.partition(" ")
            rest = rest.strip()
            where = f"{rel}:{number}"
            if word in ("config", "menuconfig"):
                conditions = [c for block in stack for c in block.conditions]
                choice = next((b.members for b in reversed(stack) if b.kind == "choice"), None)
                entry = _Definition(rest, where, conditions, choice=choice)
                self.definitions.setdefault(rest, []).append(entry)
                if choice is not None:
                    choice.append(rest)
            elif word in ("menu", "choice"):
                entry = _Block(word)
                stack.append(entry)
            elif word == "if":
                stack.append(_Block("if", [_Condition(rest, where, "if")]))
                entry = None
            elif word in ("endmenu", "endchoice", "endif"):
                if stack:
                    stack.pop()
                entry = None
            elif word == "comment":
                entry = _Block("comment")
            elif word in ("source", "osource", "rsource", "orsource"):
                self._source(path, word, rest, stack, depth)
                entry = None
            elif word == "depends" and rest.startswith("on "):
                condition = _Condition(rest[3:].strip(), where, "depends on")
                if isinstance(entry, _Definition):
                    entry.conditions.append(condition)
                elif isinstance(entry, _Block) and entry.kind in ("menu", "choice"):
                    condition.kind = f"{entry.kind} depends on"
                    entry.conditions.append(condition)
            elif word in ("select", "imply") and isinstance(entry, _Definition):
                target = rest.split(" if ")[0].strip()
                self.selectors.setdefault(target, []).append(entry.name)
            elif word in ("bool", "tristate", "string", "int", "hex", "prompt"):
                if isinstance(entry, _Definition) and rest.startswith(('"', "'")):
                    entry.prompt = True
                    visible = re.match(r"""(["'])(?:\\.|(?!\1).)*\1\s+if\s+(.+)""", rest)
                    if visible:
                        entry.conditions.append(_Condition(visible.group(2), where, "prompt if"))
            elif word in ("help", "---help---"):
                in_help, help_indent = True, None

    def _source(self, path: Path, word: str, rest: str, stack: list[_Block], depth: int) -> None:
        name = rest.strip().strip('"')
        name = name.replace("$(SRCARCH)", self.srcarch).replace("$(HEADER_ARCH)", self.srcarch)
        if "$(" in name:
            return
        base = path.parent if word.startswith(("rsource", "orsource")) else self.tree
        for found in sorted(glob.glob(str(base / name))):
            self._read(Path(found), stack, depth + 1)


def _logical_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, line) with backslash continuations joined."""
    pending, start = "", 0
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def _strip_comment(line: str) -> str:
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#":
            return line[:i]
    return line


_TOKEN = re.compile(r"""\s*(\|\||&&|!=|<=|>=|[!()=<>]|"(?:\\.|[^"])*"|'[^']*'|\$\(|[\w.+-]+)""")
_TRISTATE = {"y": 2, "m": 1, "n": 0}


def _tokens(expr: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if not match:
            break
        token, pos = match.group(1), match.end()
        if token == "$(":  # a macro: unknowable here, so taken as true
            depth = 1
            while pos < len(expr) and depth:
                depth += {"(": 1, ")": -1}.get(expr[pos], 0)
                pos += 1
            token = "$macro"
        tokens.append(token)
    return tokens


def _symbols(expr: str) -> set[str]:
    return {t for t in _tokens(expr) if re.fullmatch(r"[A-Z][A-Z0-9_]*", t)}


def _evaluate(expr: str, values: Mapping[str, str]) -> int:
    """A Kconfig expression's tristate value (0, 1, 2) with `values` from a .config."""
    tokens = _tokens(expr)
    pos = 0

    def peek() -> str:
        return tokens[pos] if pos < len(tokens) else ""

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1] if pos <= len(tokens) else ""

    def text(token: str) -> str:
        if token[:1] in "\"'":
            return token[1:-1]
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", token):
            return values.get(token, "n").strip('"')
        return token

    def tristate(token: str) -> int:
        if token == "$macro":
            return 2
        if token in _TRISTATE:
            return _TRISTATE[token]
        return _TRISTATE.get(values.get(token, "n"), 0)

    def primary() -> int:
        token = take()
        if token == "!":
            return 2 - primary()
        if token == "(":
            value = either()
            take()  # ")"
            return value
        if peek() in ("=", "!=", "<", ">", "<=", ">="):
            op, left, right = take(), text(token), text(take())
            try:
                a, b = int(left, 0), int(right, 0)
            except ValueError:
                a, b = left, right  # type: ignore[assignment]
            result = {
                "=": a == b,
                "!=": a != b,
                "<": a < b,
                ">": a > b,
                "<=": a <= b,
                ">=": a >= b,
            }[op]
            return 2 if result else 0
        return tristate(token)

    def both() -> int:
        value = primary()
        while peek() == "&&":
            take()
            value = min(value, primary())
        return value

    def either() -> int:
        value = both()
        while peek() == "||":
            take()
            value = max(value, both())
        return value

    try:
        return either()
    except (TypeError, IndexError):
        return 2  # not understood: do not blame it


# --- targets and the toolchain -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What `--target NAME` makes: make goals, extra make variables, tools, the artifact."""

    name: str
    goals: tuple[str, ...]
    variables: tuple[str, ...] = ()  # "NAME=value"
    needs: tuple[str, ...] = ()
    artifact: str = ""

    @classmethod
    def resolve(cls, name: str, table: Mapping[str, Any]) -> Target:
        targets = table or DEFAULT_TARGETS
        if name in targets:
            spec = targets[name]
            return cls(
                name,
                tuple(spec.get("goals", [name])),
                tuple(f"{k}={v}" for k, v in spec.get("variables", {}).items()),
                tuple(spec.get("needs", ())),
                spec.get("artifact", ""),
            )
        if RAW_GOAL.match(name) and ".." not in name:
            return cls(name, (name,))
        raise ToolkitError(
            f"unknown build target {name!r}",
            f"use one of {', '.join(targets)} (configs/toolkit.toml [build.targets]), "
            "or one object such as arch/x86/kvm/mmu/mmu.o",
        )


def check_tools(names: Sequence[str]) -> None:
    """Fail before make starts when a tool the build runs is not installed."""
    for name in names:
        if shutil.which(name) is None:
            package = PACKAGES.get(name, name)
            raise ToolkitError(
                f"{name} is not installed; the kernel build needs it",
                INSTALL_HINT.format(package=package),
            )


def distcc_jobs(hosts: str) -> int:
    """The job slots a DISTCC_HOSTS list offers: each host's /LIMIT, else distcc's default."""
    slots = 0
    for spec in hosts.split():
        if spec.startswith(("-", "+")):  # --randomize, --localslots=N, +zeroconf
            continue
        limit = re.search(r"/(\d+)", spec)
        local = spec.split("/")[0].split(":")[0] == "localhost"
        slots += int(limit.group(1)) if limit else (2 if local else DISTCC_SLOTS)
    return slots


# --- one make run: progress, log, failure summary ------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A finished make run."""

    steps: tuple[tuple[str, str], ...]  # ("CC", "arch/x86/kvm/mmu/mmu.o"), in order
    seconds: float
    log: Path


class Build:
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
    ) -> None:
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
        process = door.start(
            cmd, cwd=self.tree, env=_env(self.env), text=True, stderr=door.STDOUT
        )
        assert process.stdout is not None
        try:
            with self._display() as show:
                for line in process.stdout:
                    self.log_file.write(line)
                    line = line.rstrip("\n")
                    step = STEP.match(line)
                    if step:
                        steps.append((step.group(1), step.group(2)))
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
                output, code, Path(self.log_file.name), self.tree, self.build_dir, self.target
            )
        return Outcome(tuple(steps), seconds, Path(self.log_file.name))

    @contextmanager
    def _display(self) -> Iterator[Callable[[str, bool, int], None]]:
        if self.verbose:
            yield lambda line, _step, _count: self.console.print(
                line, markup=False, highlight=False
            )
            return
        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
        if self.expected:
            columns += [BarColumn(), MofNCompleteColumn()]
        else:
            columns += [TextColumn("{task.completed} steps")]
        columns += [TimeElapsedColumn(), TextColumn("[dim]{task.fields[last]}")]
        # Off a terminal (CI logs, pipes) a live bar only leaves blank lines behind: a plain
        # line every half minute says how far make is instead.
        quiet = not self.console.is_terminal
        what = f"make {' '.join(self.target.goals)}"
        done = [0]

        def so_far() -> str:
            of = f" of about {self.expected}" if self.expected else ""
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
                    progress.update(task, completed=count, total=total, last=line.strip()[:60])

            yield show


def failure(
    lines: Sequence[str], code: int, log: Path, tree: Path, build_dir: Path, target: Target
) -> ToolkitError:
    """The error for a failed make: a missing tool, the first compiler or linker error, or
    make's own complaint; the message has file:line, the hint the exit code and the log."""
    missing = _missing_tool(lines)
    if missing:
        return missing
    tail = f"make exited {code}; full log: {log}"
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
    return ToolkitError(f"build failed: {first.strip() or f'make exited {code}'}", tail)


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
    ) -> None:
        super().__init__(message, hint)
        self.file, self.line, self.context = file, line, context
        self.exit_code, self.log = exit_code, log


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


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The build's environment: English messages (they are parsed), no inherited CONFIG_."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG_", "KCONFIG_CONFIG")}
    env.update(LC_ALL="C", LANG="C")
    env.update(extra or {})
    return env


# --- the manifest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileId:
    path: str
    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> FileId:
        return cls(str(path), sha256_file(path), path.stat().st_size)


@dataclass(frozen=True)
class Manifest:
    """What was built, from what: enough to prove which kernel a test box runs."""

    tree: str
    branch: str | None
    commit: str
    dirty: bool  # the tree had uncommitted changes: the commit alone does not identify it
    kernelrelease: str
    utsversion: str
    target: str
    bzimage: FileId | None
    config: FileId
    base_config: str
    fragments: list[dict[str, str]]  # name, path, sha256
    wall_time_s: float
    ccache: dict[str, Any] | None  # hits, misses, hit_rate
    distcc_hosts: str
    jobs: int
    build_dir: str
    log: str
    built_at: str
    path: str = ""  # where this manifest is stored (not part of the JSON)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        return json.dumps({"version": STATE_VERSION, **data}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, path: str = "") -> Manifest:
        data = json.loads(text)
        data.pop("version", None)
        for key in ("bzimage", "config"):
            if data.get(key):
                data[key] = FileId(**data[key])
        return cls(**data, path=path)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            return cls.from_json(path.read_text(), str(path))
        except (OSError, ValueError, TypeError) as e:
            raise ToolkitError(f"build manifest {path}: {e}", "run `invoke build` again") from e

    def write(self, path: Path) -> Manifest:
        _write_atomic(path, self.to_json())
        return Manifest.from_json(self.to_json(), str(path))


def last_build() -> Manifest:
    """The manifest of the newest kernel image `invoke build` made (the test box's default)."""
    pointer = cache_dir() / "build" / "last.json"
    if not pointer.is_file():
        raise ToolkitError(f"no kernel built yet ({pointer} is missing)", "run `invoke build`")
    return Manifest.load(Path(json.loads(pointer.read_text())["manifest"]))


def summary(manifest: Manifest) -> str:
    """What `invoke build` prints on success."""
    lines = []
    if manifest.bzimage:
        size = manifest.bzimage.size / (1 << 20)
        lines.append(f"built {manifest.bzimage.path} ({size:.1f} MiB)")
        lines.append(f"  sha256   {manifest.bzimage.sha256}")
    else:
        lines.append(f"built {manifest.target} in {manifest.build_dir}")
    lines.append(f"  kernel   {manifest.kernelrelease} {manifest.utsversion}")
    branch = manifest.branch or "(detached)"
    dirty = " + uncommitted changes" if manifest.dirty else ""
    lines.append(f"  source   {manifest.tree} {branch} {manifest.commit[:12]}{dirty}")
    names = ", ".join(f["name"] for f in manifest.fragments) or "none"
    lines.append(f"  config   {Path(manifest.base_config).name} + {names}")
    if manifest.ccache:
        c = manifest.ccache
        calls = c["hits"] + c["misses"]
        rate = f"{c['hit_rate']:.0%} hits ({c['hits']} of {calls})" if calls else "nothing compiled"
        lines.append(f"  ccache   {rate}")
    if manifest.distcc_hosts:
        lines.append(f"  distcc   {manifest.distcc_hosts} (-j{manifest.jobs})")
    lines.append(f"  time     {manifest.wall_time_s:.1f} s")
    lines.append(f"  manifest {manifest.path}")
    return "\n".join(lines)


# --- the stage ----------------------------------------------------------------------------------


def tree_key(path: Path) -> str:
    """A build directory name per tree: its name plus a short hash of its path."""
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def default_build_dir(tree: Path) -> Path:
    return cache_dir() / "build" / tree_key(tree)


def check_kernel_tree(path: Path) -> None:
    makefile = path / "Makefile"
    if not (path / "Kconfig").is_file() or not (path / "scripts/kconfig/merge_config.sh").is_file():
        raise ToolkitError(
            f"tree {path} is not a kernel tree (no Kconfig or scripts/kconfig/merge_config.sh)",
            "pass --tree with a Linux source checkout, or set tree.path in configs/local.toml",
        )
    if not re.search(r"^VERSION = \d+", makefile.read_text(errors="replace"), re.MULTILINE):
        raise ToolkitError(
            f"tree {path}: its Makefile has no kernel VERSION",
            "pass --tree with a Linux source checkout",
        )


def build(
    config: Config,
    *,
    tree: str = "",
    out: str = "",
    fragments: Sequence[str] = (),
    base_config: str = "",
    jobs: int = 0,
    target: str = "",
    distcc: str = "",
    arch: str = "",
    verbose: bool = False,
    log: Log = print,
    console: Console | None = None,
    set_last: bool = True,
) -> Manifest:
    """Configure and build the tree's checked-out commit; write and return the manifest.

    Empty arguments fall back to configs/ ([build]: base_config, fragments, target, jobs,
    distcc_hosts, ccache). A bzImage build also becomes the last build (last_build()), the
    test box's default, unless `set_last` is false (builds of throwaway trees). `arch` is
    make's ARCH (e.g. i386 for the 32-bit build of the check stage); empty: the host's.
    Raises ToolkitError for anything the user can fix.
    """
    started = time.monotonic()
    settings = config.table("build", BUILD)
    build_config = BuildConfig.resolve(
        base_config or settings.get("base_config") or "tinyconfig",
        list(fragments) or list(settings.get("fragments", [])),
        config.directory,
        arch,
    )
    chosen = Target.resolve(
        target or settings.get("target") or "bzImage", settings.get("targets", {})
    )
    hosts = distcc or settings.get("distcc_hosts", "")
    use_ccache = bool(not hosts and settings.get("ccache", True) and shutil.which("ccache"))
    check_tools([*TOOLS, *chosen.needs, *(["distcc"] if hosts else [])])
    chosen_dir = output_dir(Path(out)).resolve() if out else None  # refused before any work
    work = tree_stage.open_tree(config, tree, log=log)
    check_kernel_tree(work.path)
    build_dir = chosen_dir or default_build_dir(work.path)
    if build_dir == work.path or work.path in build_dir.parents:
        raise ToolkitError(
            f"build directory {build_dir} is inside the tree {work.path}",
            "pass --out with a directory outside the tree (default: ~/.cache)",
        )
    cpus = os.cpu_count() or 1
    jobs = jobs or int(settings.get("jobs") or 0) or max(cpus, distcc_jobs(hosts))
    env: dict[str, str] = {}
    make_vars: list[str] = [f"ARCH={arch}"] if arch else []
    if hosts:
        make_vars.append("CC=distcc gcc")
        env["DISTCC_HOSTS"] = hosts
    elif use_ccache:
        make_vars.append("CC=ccache gcc")
        env.update(_ccache_basedir(work.path, build_dir))
    own = build_dir / "kseries"
    own.mkdir(parents=True, exist_ok=True)
    with (
        exclusive(own / "lock", f"build: waiting for another build in {own.parent}", log),
        _Source(work) as source,
    ):
        state = _read_state(own / "state.json")
        with (own / "build.log").open("w") as log_file:
            log_file.write(f"# kseries build of {work.path} in {build_dir}\n")
            build_config.prepare(work.path, build_dir, make_vars, log_file, state, log)
            _write_state(own / "state.json", state)
            config_sha = sha256_file(build_dir / ".config")
            built_before = state.get("built", {}).get(chosen.name) == config_sha
            key = f"{config_sha[:16]}:{chosen.name}:{'incremental' if built_before else 'full'}"
            stats_log = own / "ccache-stats.log" if use_ccache else None
            if stats_log:
                stats_log.write_text("")
                env["CCACHE_STATSLOG"] = str(stats_log)
            runner = Build(
                work.path,
                build_dir,
                chosen,
                jobs=jobs,
                make_vars=make_vars,
                env=env,
                log_file=log_file,
                verbose=verbose,
                console=console,
                expected=state.get("steps", {}).get(key, 0),
            )
            try:
                outcome = runner.run()
            except BuildError as e:
                for line in e.context:
                    log(f"  {line}")
                raise
        state.setdefault("steps", {})[key] = len(outcome.steps)
        state.setdefault("built", {})[chosen.name] = config_sha
        _write_state(own / "state.json", state)
        manifest = Manifest(
            tree=str(work.path),
            branch=source.branch,
            commit=source.commit,
            dirty=source.dirty(),
            kernelrelease=kernelrelease(work.path, build_dir),
            utsversion=utsversion(build_dir),
            target=chosen.name,
            bzimage=FileId.of(build_dir / IMAGE) if (build_dir / IMAGE).is_file() else None,
            config=FileId.of(build_dir / ".config"),
            base_config=build_config.base,
            fragments=[
                {"name": f.name, "path": str(f.path), "sha256": sha256_file(f.path)}
                for f in build_config.fragments
            ],
            wall_time_s=round(time.monotonic() - started, 2),
            ccache=ccache_stats(stats_log) if stats_log else None,
            distcc_hosts=hosts,
            jobs=jobs,
            build_dir=str(build_dir),
            log=str(outcome.log),
            built_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        return _record(manifest, chosen, build_dir, set_last)


class _Source:
    """The commit being built, read as the build starts. Whether the tree has uncommitted
    changes is asked of git meanwhile, in the background: on 90k files that takes a while.
    `--no-optional-locks`: the status must not rewrite the tree's index."""

    def __init__(self, work: WorkTree) -> None:
        head = work.head()
        self.branch = head.removeprefix("refs/heads/") if head.startswith("refs/") else None
        self.commit = work.git("rev-parse", "HEAD").strip()
        self._status = door.start(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=work.path,
            stderr=door.DEVNULL,
            text=True,
        )
        self._dirty: bool | None = None

    def dirty(self) -> bool:
        if self._dirty is None:
            out, _ = self._status.communicate()
            self._dirty = bool(out.strip())
        return self._dirty

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dirty()  # reap git


def kernelrelease(tree: Path, build_dir: Path) -> str:
    """`make -s kernelrelease` of a configured build directory."""
    done = door.run(
        ["make", "-s", "-C", tree, f"O={build_dir}", "kernelrelease"],
        cwd=tree,
        env=_env(),
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def utsversion(build_dir: Path) -> str:
    """The UTS_VERSION the kernel reports in /proc/version ("#3 SMP PREEMPT <date>")."""
    header = build_dir / "include/generated/utsversion.h"
    match = re.search(r'UTS_VERSION "(.*)"', header.read_text()) if header.is_file() else None
    return match.group(1) if match else ""


def _record(manifest: Manifest, target: Target, build_dir: Path, set_last: bool) -> Manifest:
    """Write the manifest next to the image (and point last.json at it), or, for a target
    without one, into the build directory's kseries/."""
    if target.artifact != IMAGE or manifest.bzimage is None:
        return manifest.write(build_dir / "kseries" / f"manifest-{_safe(target.name)}.json")
    manifest = manifest.write((build_dir / IMAGE).parent / "manifest.json")
    if set_last:
        pointer = {
            "manifest": manifest.path,
            "bzimage": manifest.bzimage.path if manifest.bzimage else "",
            "kernelrelease": manifest.kernelrelease,
            "utsversion": manifest.utsversion,
        }
        _write_atomic(cache_dir() / "build" / "last.json", json.dumps(pointer, indent=2) + "\n")
    return manifest


def _ccache_basedir(tree: Path, build_dir: Path) -> dict[str, str]:
    """Let ccache share results between trees laid out alike (a worktree and its build dir):
    it then hashes paths under the tree's and build directory's common parent as relative.
    Left alone if the user set a base_dir of their own."""
    if os.environ.get("CCACHE_BASEDIR"):
        return {}
    configured = door.run(["ccache", "--get-config", "base_dir"], check=False).stdout.strip()
    common = Path(os.path.commonpath([tree, build_dir]))
    if configured or common == Path(common.anchor):
        return {}
    return {"CCACHE_BASEDIR": str(common)}


def ccache_stats(stats_log: Path) -> dict[str, Any] | None:
    """Hits and misses of this build's compilations, from ccache's per-build stats log.

    The log is one "# FILE" line per ccache call, then its counters. Calls on /dev/null are
    kbuild's compiler-feature probes, not compilations: they are left out.
    """
    try:
        entries = stats_log.read_text().split("# ")
    except OSError:
        return None
    hits = misses = 0
    for entry in entries:
        name, _, counters = entry.partition("\n")
        if name.strip() in ("", "/dev/null"):
            continue
        words = counters.split()
        hits += "direct_cache_hit" in words or "preprocessed_cache_hit" in words
        misses += "cache_miss" in words
    rate = round(hits / (hits + misses), 4) if hits + misses else 0.0
    return {"hits": hits, "misses": misses, "hit_rate": rate}


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if state.get("version") == STATE_VERSION else {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    _write_atomic(path, json.dumps({**state, "version": STATE_VERSION}, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)
