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
        }
    )
)
SKIP_EXIT = 4  # kselftest's KSFT_SKIP


@dataclass(frozen=True)
class Recipe:
    name: str
    command: str
    output: str
    headers: bool = False
    strip: bool = True  # strip debug info before upload (smaller, faster to send)


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

    @property
    def needs_upload(self) -> bool:
        return bool(self.binary or self.recipe)

    @property
    def is_soak(self) -> bool:
        return self.per_cycle is not None

    def argv(self, box_vars: dict[str, str], where: str) -> list[str]:
        """The args with their {NAME}s filled in from the box's vars over the test's own."""
        values = {**self.vars, **box_vars}
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
    """A test ready to run: its spec and, for an uploaded program, the bytes to send."""

    spec: TestSpec
    data: bytes | None = None
    source: Path | None = None
    error: str = ""  # why it could not be built (the test then reports "error")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else ""


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

    def __init__(self, tree: Path | None, *, jobs: int = 0, log: Log = lambda _: None) -> None:
        self.tree = tree
        self.jobs = jobs or os.cpu_count() or 1
        self.log = log
        self.root = test_programs_dir(tree)
        self._headers: Path | None = None

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
        if spec.command:
            return Built(spec)
        try:
            if spec.binary:
                path = Path(spec.binary.format(tree=self.tree or ""))
                if not path.is_file():
                    raise ToolkitError(f"{path}: no such file", "build it or fix the path")
                return Built(spec, path.read_bytes(), path)
            # Two runs may build the same tree's tests at once: make in one O= directory at a
            # time, and the bytes are read before the lock is let go.
            waiting = f"tests: waiting for another build of the test programs in {self.root}"
            with exclusive(self.root / ".lock", waiting, self.log):
                return self._recipe(spec)
        except ToolkitError as e:
            return Built(spec, error=str(e))

    def _recipe(self, spec: TestSpec) -> Built:
        recipe = spec.recipe
        assert recipe is not None
        if self.tree is None:
            raise ToolkitError(
                f"test {spec.name}: no kernel tree to build {spec.target} from",
                "test a kernel with a build manifest (invoke build), which names its tree",
            )
        out = self.root / recipe.name
        out.mkdir(parents=True, exist_ok=True)
        log_file = out / "build.log"
        values = {
            "tree": str(self.tree),
            "project": str(PROJECT),
            "out": str(out),
            "target": spec.target,
            "jobs": str(self.jobs),
        }
        if recipe.headers:
            values["headers"] = str(self.headers(log_file))
        quoted = {k: shlex.quote(v) for k, v in values.items()}
        command = recipe.command.format(**quoted)
        self._run(["sh", "-c", command], log_file, f"{recipe.name} {spec.target}")
        output = Path(recipe.output.format(**values))
        if not output.is_file():
            raise ToolkitError(f"recipe {recipe.name} made no {output}", f"see {log_file}")
        if recipe.strip:
            stripped = output.with_name(output.name + ".stripped")
            if not stripped.is_file() or stripped.stat().st_mtime < output.stat().st_mtime:
                scratch = scratch_name(stripped)
                run(["strip", "--strip-debug", "-o", scratch, output])
                os.replace(scratch, stripped)
            return Built(spec, stripped.read_bytes(), output)
        return Built(spec, output.read_bytes(), output)

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
