"""The tests a box runs, as data: `[[test]]` entries and `[recipe.NAME]` build recipes in
configs/testboxes.toml. Adding a test touches no Python.

A test is one of:
- `command`: a shell command run on the box as is (the smoke test);
- `binary`: a local executable, uploaded and run with `args`;
- `recipe` + `target`: a program built on this machine by a recipe (e.g. a KVM selftest built
  statically from the kernel's own tree, so it runs in the initramfs), then uploaded and run.

Recipes are shell commands with placeholders: {tree} (the kernel tree the kernel under test was
built from), {project} (this toolkit's checkout, for the programs under tests/box), {out} (the
recipe's build directory under ~/.cache/kseries/testbox/build), {target}, {headers} (the tree's
UAPI headers from `make headers_install`, when the recipe says `headers = true`) and {jobs}.
They run outside the tree's git state: all output goes to {out}.

A test's `args` may name per-box facts as {NAME}: the box's `vars` table gives the value, the
test's own `vars` the default (the vfio-bar-race test takes its device's BDF so).

A test's `files` are uploaded beside its program, and each {NAME} in its args becomes the path
of that file on the box. A file comes from this machine:
  "kernel"                    the kernel under test (e.g. the L2 guest of a nested test);
  "recipe:RECIPE/TARGET"      a recipe's program, built as a test's would be;
  "series:NAME" / "NAME@N"    another series (a directory under configs/) built by the build
                              stage at its branch's tip, or after its first N patches;
  "file:PATH"                 a local file (relative to configs/).
A test with `cells` reports a matrix: its summary line carries CELL_METRIC keys for each of
its metrics, and the report shows one row per kernel and one column per cell.

A test with a `soak` table takes `--cycles N` and `--duration S` (`invoke test-remote --cycles`
and `--duration` pass them on); its timeout grows by `per_cycle` seconds a cycle, or by S.
A test whose last output line reads `NAME: result=PASS|FAIL|SKIP|ERROR key=value ...` is judged
by that line; the keys listed in its `metrics` go into the soak report.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from kseries.config import BOOLEAN, NUMBER, STRING, STRING_TABLE, STRINGS, Keys, Names, Rows
from kseries.core.files import exclusive, scratch_name
from kseries.core.run import STDOUT, run
from kseries.errors import ToolkitError
from kseries.paths import PROJECT, test_programs_dir
from kseries.testbox.box import FILE, TestboxConfig
from kseries.ui import heartbeat

Log = Callable[[str], None]
RECIPES = Names(
    Keys(
        {
            "command": STRING,
            "output": STRING,
            "headers": BOOLEAN,
            "description": STRING,
            "strip": BOOLEAN,
        }
    )
)
TESTS = Rows(
    Keys(
        {
            "name": STRING,
            "command": STRING,
            "binary": STRING,
            "recipe": STRING,
            "target": STRING,
            "args": STRINGS,
            "timeout": NUMBER,
            "env": STRING_TABLE,
            "description": STRING,
            "default": BOOLEAN,
            "vars": STRING_TABLE,
            "soak": Keys({"per_cycle": NUMBER}),
            "metrics": STRINGS,
            "files": STRING_TABLE,
            "cells": STRINGS,
        }
    )
)
FILE_KINDS = ("kernel", "recipe:RECIPE/TARGET", "series:NAME[@N]", "file:PATH")
SKIP_EXIT = 4  # kselftest's KSFT_SKIP


@dataclass(frozen=True)
class Recipe:
    name: str
    command: str
    output: str
    headers: bool = False
    strip: bool = True  # strip debug info before upload (smaller, faster to send)


@dataclass(frozen=True)
class FileSource:
    """Where one of a test's `files` comes from (see FILE_KINDS)."""

    kind: str  # kernel, recipe, series, file
    value: str = ""  # the series' name, or the file's path
    recipe: Recipe | None = None
    target: str = ""
    patches: int | None = None  # series: its branch after this many patches (None: the tip)

    @classmethod
    def parse(cls, text: str, recipes: dict[str, Recipe], directory: Path) -> FileSource:
        """The source `text` names; ValueError (problem, hint) for one that cannot be."""
        kind, _, value = text.partition(":")
        if text == "kernel":
            return cls("kernel")
        if kind == "recipe" and "/" in value:
            name, _, target = value.partition("/")
            if name not in recipes:
                raise ValueError(f"no [recipe.{name}]", f"recipes: {', '.join(sorted(recipes))}")
            return cls("recipe", recipe=recipes[name], target=target)
        if kind == "series" and value:
            name, at, count = value.partition("@")
            if at and not (count.isdigit() and int(count) > 0):
                raise ValueError(f"{text}: @N is a number of patches", f"e.g. series:{name}@1")
            return cls("series", name, patches=int(count) if at else None)
        if kind == "file" and value:
            return cls("file", str((directory / Path(value).expanduser()).resolve()))
        raise ValueError(f"{text!r} names no source", f"one of: {', '.join(FILE_KINDS)}")


@dataclass(frozen=True)
class TestSpec:
    name: str
    command: str = ""
    binary: str = ""
    recipe: Recipe | None = None
    target: str = ""
    args: tuple[str, ...] = ()
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    description: str = ""
    default: bool = True  # part of the run when --tests is not given
    vars: dict[str, str] = field(default_factory=dict)  # defaults of the {NAME}s in args
    per_cycle: float | None = None  # set: a soak test (takes --cycles and --duration)
    metrics: tuple[str, ...] = ()  # summary-line keys shown in the soak report
    files: dict[str, FileSource] = field(default_factory=dict)  # {NAME} in args -> source
    cells: tuple[str, ...] = ()  # a matrix test's columns (its keys are CELL_METRIC)

    @property
    def shown(self) -> tuple[str, ...]:
        """The summary-line keys the report shows: a matrix's CELL_METRIC, in cell order."""
        if not self.cells:
            return self.metrics
        return tuple(f"{cell}_{metric}" for cell in self.cells for metric in self.metrics)

    @property
    def is_soak(self) -> bool:
        return self.per_cycle is not None

    def argv(
        self, box_vars: dict[str, str], where: str, files: dict[str, str] | None = None
    ) -> list[str]:
        """The args with their {NAME}s filled in: the paths of its files on the box, else the
        box's vars over the test's own."""
        values = {**self.vars, **box_vars, **(files or {})}
        try:
            return [a.format_map(values) for a in self.args]
        except KeyError as e:
            raise ToolkitError(
                f"test {self.name}: no value for {{{e.args[0]}}} in its args on {where}",
                f"set vars = {{ {e.args[0]} = ... }} in the box's table or the test's",
            ) from None

    def soaked(self, cycles: int = 0, duration: float = 0) -> TestSpec:
        """This test as a soak of `cycles` cycles and/or `duration` seconds (whichever ends
        first); its timeout grows by the longest the soak may take."""
        if self.per_cycle is None or not (cycles or duration):
            return self
        args, extra = list(self.args), []
        if cycles:
            args += ["--cycles", str(cycles)]
            extra.append(cycles * self.per_cycle)
        if duration:
            args += ["--duration", f"{duration:g}"]
            extra.append(duration)
        return replace(self, args=tuple(args), timeout=(self.timeout or 0.0) + min(extra))


@dataclass(frozen=True)
class Built:
    """A test ready to run: its spec and, for an uploaded program, the bytes to send, and its
    files' bytes by name."""

    spec: TestSpec
    data: bytes | None = None
    source: Path | None = None
    error: str = ""  # why it could not be built (the test then reports "error")
    files: dict[str, bytes] = field(default_factory=dict)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else ""

    def with_kernel(self, image: bytes) -> Built:
        """This test with its "kernel" files set to the kernel a run boots."""
        named = [name for name, source in self.spec.files.items() if source.kind == "kernel"]
        return replace(self, files={**self.files, **dict.fromkeys(named, image)}) if named else self

    def program_path(self, workdir: str) -> str:
        """Where its program goes on the box: named by content, so a box keeps what it has."""
        return f"{workdir}/tests/{self.spec.name}-{self.sha256[:12]}" if self.data else ""

    @cached_property
    def digests(self) -> dict[str, str]:
        """Each file's sha256, hashed once: its name on the box, and what the box must hold."""
        return {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()}

    def file_paths(self, workdir: str) -> dict[str, str]:
        """{NAME} -> where that file goes on the box (named by content too)."""
        return {name: f"{workdir}/files/{name}-{sha[:12]}" for name, sha in self.digests.items()}

    def uploads(self, workdir: str) -> dict[str, tuple[bytes, str]]:
        """Path on the box -> (bytes, sha256), for the program and every file."""
        paths = self.file_paths(workdir)
        placed = {paths[name]: (data, self.digests[name]) for name, data in self.files.items()}
        if self.data is None:
            return placed
        return {self.program_path(workdir): (self.data, self.sha256), **placed}


def load_tests(config: TestboxConfig) -> list[TestSpec]:
    files = config.files
    recipes = {}
    for name, table in files.table("recipe", RECIPES).items():
        if "command" not in table or "output" not in table:
            where = files.where.table("recipe").table(name)
            raise where.error(None, "needs command and output", "see the file")
        recipes[name] = Recipe(
            name,
            table["command"],
            table["output"],
            table.get("headers", False),
            table.get("strip", True),
        )
    tests = []
    for index, table in enumerate(files.table("test", TESTS)):
        where = files.where.row("test", index)
        name = table.get("name")
        if not name:
            raise where.error("name", "no name", "give every test a name")
        where = replace(where, label=f"{where.label} ({name})")
        kinds = [k for k in ("command", "binary", "recipe") if table.get(k)]
        if len(kinds) != 1:
            raise where.error(
                None,
                "set exactly one of command, binary or recipe",
                "command runs on the box; binary and recipe upload a program",
            )
        recipe = None
        if table.get("recipe"):
            recipe = recipes.get(table["recipe"])
            if recipe is None:
                raise where.error(
                    "recipe",
                    f"no [recipe.{table['recipe']}]",
                    f"recipes: {', '.join(sorted(recipes)) or 'none'}",
                )
            if not table.get("target"):
                raise where.error("target", "a recipe test needs a target", "")
        soak = table.get("soak")
        sources = {}
        for key, text in table.get("files", {}).items():
            try:
                sources[key] = FileSource.parse(text, recipes, config.directory)
            except ValueError as e:
                problem, hint = e.args
                raise where.error("files", f"files.{key}: {problem}", hint) from None
        cells = tuple(table.get("cells", ()))
        if cells and not table.get("metrics"):
            raise where.error("cells", "a matrix needs metrics", "metrics = the keys per cell")
        binary = table.get("binary", "")
        if binary and "{" not in binary:
            binary = str((config.directory / Path(binary).expanduser()).resolve())
        tests.append(
            TestSpec(
                name=name,
                command=table.get("command", ""),
                binary=binary,
                recipe=recipe,
                target=table.get("target", ""),
                args=tuple(table.get("args", ())),
                timeout=float(table["timeout"]) if "timeout" in table else None,
                env=dict(table.get("env", {})),
                description=table.get("description", ""),
                default=table.get("default", True),
                vars=dict(table.get("vars", {})),
                per_cycle=float(soak.get("per_cycle", 0.1)) if soak is not None else None,
                metrics=tuple(table.get("metrics", ())),
                files=sources,
                cells=cells,
            )
        )
    names = [t.name for t in tests]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        where = files.where.rows("test")
        raise where.error(None, f"duplicate test names {', '.join(duplicates)}", "rename")
    return tests


def select(tests: Sequence[TestSpec], names: Sequence[str]) -> list[TestSpec]:
    """The named tests in the order asked (default: every test with default = true)."""
    if not names:
        return [t for t in tests if t.default]
    by_name = {t.name: t for t in tests}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ToolkitError(
            f"unknown test {', '.join(unknown)}",
            f"tests in configs/{FILE}: {', '.join(by_name)}",
        )
    return [by_name[n] for n in names]


def soak(
    selected: Sequence[TestSpec], cycles: int, duration: float, known: Sequence[TestSpec]
) -> list[TestSpec]:
    """--cycles/--duration applied to the soak tests among the selected ones."""
    if cycles < 0 or duration < 0:
        raise ToolkitError("--cycles and --duration cannot be negative", "give a count/seconds")
    if (cycles or duration) and not any(t.is_soak for t in selected):
        soakers = ", ".join(t.name for t in known if t.is_soak) or "none"
        raise ToolkitError(
            "--cycles/--duration apply to soak tests, and none of the selected tests is one",
            f"select one with --tests; soak tests in configs/{FILE}: {soakers}",
        )
    return [t.soaked(cycles, duration) for t in selected]


class Builder:
    """Builds the recipe tests of one kernel tree into ~/.cache/kseries/testbox/build/KEY/."""

    def __init__(
        self,
        tree: Path | None,
        *,
        jobs: int = 0,
        log: Log = lambda _: None,
        series: Callable[[str, int | None], Path] | None = None,
    ) -> None:
        self.tree = tree
        self.jobs = jobs or os.cpu_count() or 1
        self.log = log
        self.root = test_programs_dir(tree)
        self._headers: Path | None = None
        self.series = series  # (name, patches) -> that series built there: "series:" files

    def headers(self, log_file: Path) -> Path:
        """`make headers_install` of the tree into our own O= directory (incremental)."""
        if self._headers is None:
            assert self.tree is not None
            out = self.root / "headers"
            self._run(
                ["make", "-s", "-C", str(self.tree), f"O={out}", "headers_install"],
                log_file,
                "headers_install",
            )
            self._headers = out / "usr" / "include"
        return self._headers

    def build(self, spec: TestSpec) -> Built:
        try:
            files = {
                name: self._file(spec, source)
                for name, source in spec.files.items()
                if source.kind != "kernel"  # the kernel of each run: Built.with_kernel()
            }
            if spec.command:
                return Built(spec, files=files)
            if spec.binary:
                return Built(
                    spec, *self._local(spec.binary.format(tree=self.tree or "")), files=files
                )
            assert spec.recipe is not None
            data, source = self._recipe(spec.name, spec.recipe, spec.target)
            return Built(spec, data, source, files=files)
        except ToolkitError as e:
            return Built(spec, error=str(e))

    def _file(self, spec: TestSpec, source: FileSource) -> bytes:
        if source.kind == "file":
            return self._local(source.value)[0]
        if source.kind == "recipe":
            assert source.recipe is not None
            return self._recipe(spec.name, source.recipe, source.target)[0]
        if self.series is None:
            raise ToolkitError(
                f"test {spec.name}: nothing here builds another series", "run it from test-remote"
            )
        return self.series(source.value, source.patches).read_bytes()

    @staticmethod
    def _local(name: str) -> tuple[bytes, Path]:
        path = Path(name)
        if not path.is_file():
            raise ToolkitError(f"{path}: no such file", "build it or fix the path")
        return path.read_bytes(), path

    def _recipe(self, test: str, recipe: Recipe, target: str) -> tuple[bytes, Path]:
        """Its program's bytes and path. Two runs may build the same tree's tests at once:
        make in one O= directory at a time, and the bytes are read before the lock goes."""
        waiting = f"tests: waiting for another build of the test programs in {self.root}"
        with exclusive(self.root / ".lock", waiting, self.log):
            return self._make(test, recipe, target)

    def _make(self, test: str, recipe: Recipe, target: str) -> tuple[bytes, Path]:
        if self.tree is None:
            raise ToolkitError(
                f"test {test}: no kernel tree to build {target} from",
                "test a kernel with a build manifest (invoke build), which names its tree",
            )
        out = self.root / recipe.name
        out.mkdir(parents=True, exist_ok=True)
        log_file = out / "build.log"
        values = {
            "tree": str(self.tree),
            "project": str(PROJECT),
            "out": str(out),
            "target": target,
            "jobs": str(self.jobs),
        }
        if recipe.headers:
            values["headers"] = str(self.headers(log_file))
        quoted = {k: shlex.quote(v) for k, v in values.items()}
        command = recipe.command.format(**quoted)
        self._run(["sh", "-c", command], log_file, f"{recipe.name} {target}")
        output = Path(recipe.output.format(**values))
        if not output.is_file():
            raise ToolkitError(f"recipe {recipe.name} made no {output}", f"see {log_file}")
        if recipe.strip:
            stripped = output.with_name(output.name + ".stripped")
            if not stripped.is_file() or stripped.stat().st_mtime < output.stat().st_mtime:
                scratch = scratch_name(stripped)
                run(["strip", "--strip-debug", "-o", scratch, output])
                os.replace(scratch, stripped)
            return stripped.read_bytes(), output
        return output.read_bytes(), output

    def _run(self, cmd: list[str], log_file: Path, what: str) -> None:
        with log_file.open("a") as f, heartbeat(f"building {what}", lambda: ""):
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            done = run(cmd, stdout=f, stderr=STDOUT, check=False)
        if not done.ok:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
            first = next((x for x in tail if "rror" in x), tail[-1] if tail else "")
            raise ToolkitError(
                f"building {what} failed (exit {done.status}): {first.strip()}",
                f"the whole output is in {log_file}",
            )
