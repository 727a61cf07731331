"""`invoke check`: every commit of the series builds, in every configuration the gates in
`[[check.gate]]` (configs/toolkit.toml) name, with no warning the base did not have.

This is what a maintainer's bisection and the 0-day bot would find: the series is built
commit by commit, not only at its tip. Each gate is one configuration (base config, fragments,
ARCH, a target such as `arch/x86/kvm/` with W=1) built by the build stage in its own kept
build directory, so after the base only what a commit changed is recompiled. A commit fails a
gate when its build fails, or when the objects it recompiled print a warning (file and text,
line numbers aside) that the base's full build did not print.

The commits are checked out in a detached worktree under ~/.cache/kseries/check/, never in the
tree itself, so the user's checkout, index and branch stay as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from kseries import build as build_stage
from kseries import records
from kseries.build import WARNING, BuildConfig, BuildError
from kseries.build.meson import MesonConfig
from kseries.build.orchestrate import meson_config
from kseries.config import BOOLEAN, STRING, STRINGS, Config, Keys, Rows
from kseries.core.files import exclusive
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.paths import check_dir, worktree_dir
from kseries.series import Series

Log = Callable[[str], None]
CHECK = Keys(
    {
        "gate": Rows(
            Keys(
                {
                    "name": STRING,
                    "description": STRING,
                    "base_config": STRING,
                    "fragments": STRINGS,
                    "target": STRING,
                    "arch": STRING,
                    # false: the base does not build in this gate (the series' first patch
                    # is the build fix), so every commit must build and there are no base
                    # warnings to allow
                    "base_builds": BOOLEAN,
                }
            )
        )
    }
)


@dataclass(frozen=True)
class Gate:
    """One configuration every commit must build in."""

    name: str
    base_config: str
    fragments: tuple[str, ...]
    target: str
    arch: str = ""
    description: str = ""
    base_builds: bool = True

    @classmethod
    def load_all(cls, config: Config) -> list[Gate]:
        """The gates, each checked now (its files exist), not after the first build. A QEMU
        series' gate (the meson build kind) is its own [build.meson] configuration: it names
        only a target, and base_config, fragments and arch are for kernel builds."""
        tables = config.table("check", CHECK).get("gate", [])
        if not tables:
            where = config.where.table("check").rows("gate")
            raise where.error(None, "no gates", "add a [[check.gate]] table")
        meson = meson_config(config) is not None
        gates = []
        for index, table in enumerate(tables):
            where = config.where.table("check").row("gate", index)
            kernel_only = [k for k in ("base_config", "fragments", "arch") if k in table]
            if meson and kernel_only:
                raise where.error(
                    kernel_only[0],
                    f"{kernel_only[0]} is for kernel builds; this series builds with meson",
                    "a meson gate names a target only: it builds [build.meson]'s configuration",
                )
            required = ("name",) if meson else ("name", "base_config", "fragments", "target")
            missing = [k for k in required if not table.get(k)]
            if missing:
                raise where.error(None, f"no {', '.join(missing)}", "see the file")
            gate = cls(
                table["name"],
                table.get("base_config", ""),
                tuple(table.get("fragments", ())),
                table.get("target", ""),
                table.get("arch", ""),
                table.get("description", ""),
                table.get("base_builds", True),
            )
            gate.inputs(config)
            gates.append(gate)
        return gates

    def inputs(self, config: Config) -> BuildConfig | MesonConfig:
        """What the gate builds from besides the tree (every file checked)."""
        meson = meson_config(config)
        if meson is not None:
            return meson
        return BuildConfig.resolve(self.base_config, self.fragments, config.directory, self.arch)

    def digest(self, config: Config) -> str:
        """Changes when the gate or one of its inputs' text does (the base warnings are then
        stale)."""
        return hashlib.sha256(f"{self}\0{self.inputs(config).digest()}".encode()).hexdigest()


@dataclass
class GateResult:
    """One commit through one gate."""

    gate: str
    commit: str
    subject: str
    ok: bool
    error: str = ""
    new_warnings: list[str] = field(default_factory=list)
    recompiled: int = 0
    seconds: float = 0.0


def warnings(log_text: str, tree: Path, build_dir: Path) -> set[str]:
    """`file: warning text [-Wflag]` for each warning gcc printed, without line numbers, so a
    warning that only moved is not new. kbuild prints paths relative to the build directory:
    those are shown relative to the tree; others (the selftests build prints them relative to
    its own directory) as printed, which is the same for the base and every commit."""
    found = set()
    for line in log_text.splitlines():
        match = WARNING.match(line.strip())
        if not match:
            continue
        name = match["file"]
        path = Path(name) if Path(name).is_absolute() else build_dir / name
        relative = os.path.relpath(path.resolve(), tree.resolve())
        if not relative.startswith(".."):
            name = relative
        found.add(f"{name}: {match['text']}")
    return found


class SeriesCheck:
    """The series' commits (base..branch) through every gate."""

    def __init__(self, config: Config, tree: WorkTree, *, log: Log = print) -> None:
        self.config = config
        self.tree = tree
        self.log = log
        self.root = check_dir(tree.path, config.series_key)
        self.worktree = worktree_dir(self.root, tree.path)

    def commits(self, base_ref: str, branch: str) -> tuple[str, list[tuple[str, str]]]:
        """The base sha and the series' (sha, subject) pairs, oldest first."""
        for ref in (base_ref, branch):
            if self.tree.try_git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}")[0] != 0:
                raise ToolkitError(
                    f"{self.tree.path}: no {ref}",
                    "run `invoke rebase` first (it makes the series branch on the base)",
                )
        base = records.series_base(self.tree, branch, base_ref)
        lines = self.tree.git("log", "--reverse", "--format=%H %s", f"{base}..{branch}")
        commits = [(x[:40], x[41:]) for x in lines.splitlines() if x]
        if not commits:
            raise ToolkitError(f"{branch} has no commits on top of {base_ref}", "invoke rebase")
        return base, commits

    def run(self, gates: Sequence[Gate], base_ref: str, branch: str) -> list[GateResult]:
        base, commits = self.commits(base_ref, branch)
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive(
            self.root / "lock", f"check: waiting for another check of {self.tree.path}", self.log
        ):
            self._worktree(base)
            results = [r for gate in gates for r in self._gate(gate, base, commits)]
            self._record(gates, branch, base, commits, results)
            return results

    def _record(
        self,
        gates: Sequence[Gate],
        branch: str,
        base: str,
        commits: Sequence[tuple[str, str]],
        results: Sequence[GateResult],
    ) -> None:
        """Keep, per gate, which commits it built and which failed, for send's cover letter
        (records.check_record); the other gates' entries stay, so `--gate X` adds to them. A
        damaged record is replaced: this run's gates are all it can vouch for."""
        path = records.check_record(self.tree, branch)
        try:
            data = records.read(path, "check record", "invoke check") or {}
        except ToolkitError:
            data = {}
        every = dict(data.get("gates") or {})
        for gate in gates:
            mine = [r for r in results if r.gate == gate.name]
            every[gate.name] = {
                "description": gate.description,
                "base": base,
                "tip": commits[-1][0],
                "commits": len(mine),
                "failed": [r.commit for r in mine if not r.ok],
            }
        records.write(path, {"branch": branch, "gates": every})

    def _gate(self, gate: Gate, base: str, commits: Sequence[tuple[str, str]]) -> list[GateResult]:
        out = self.root / "build" / gate.name
        known = self._base_warnings(gate, base, out)
        results = []
        for sha, subject in commits:
            self._checkout(sha)
            result = self._build(gate, out, sha, subject, known)
            results.append(result)
            state = "ok" if result.ok else "FAIL"
            self.log(f"check: {gate.name}: {sha[:12]} {subject}: {state}")
        return results

    # --- the parts ------------------------------------------------------------------------------

    def _worktree(self, base: str) -> None:
        if not (self.worktree / ".git").exists():
            self.log(f"check: adding a detached worktree at {self.worktree}")
            shutil.rmtree(self.worktree, ignore_errors=True)
            self.worktree.parent.mkdir(parents=True, exist_ok=True)
            self.tree.git("worktree", "prune")
            self.tree.git("worktree", "add", "--detach", str(self.worktree), base)

    def _checkout(self, sha: str) -> None:
        WorkTree(self.worktree).git("checkout", "-q", "--detach", sha)

    def _base_warnings(self, gate: Gate, base: str, out: Path) -> set[str]:
        """The base's warnings in this gate, from a full build (kept, keyed on the base and
        the gate: a build directory of unknown state is started afresh)."""
        stamp = out / "kseries" / "check-base.json"
        digest = gate.digest(self.config)
        if stamp.is_file():
            saved = json.loads(stamp.read_text())
            if saved.get("base") == base and saved.get("gate") == digest:
                return set(saved["warnings"])
        shutil.rmtree(out, ignore_errors=True)
        self._checkout(base)
        self.log(f"check: {gate.name}: building the base {base[:12]} in full")
        made = self._make(gate, out)
        if made.error and gate.base_builds:
            where = self.config.where.table("check").rows("gate")
            raise ToolkitError(
                f"check {gate.name}: the base {base[:12]} does not build: {made.error}",
                f"see {out / 'kseries' / 'build.log'}; fix the gate in {where.file()}, or set "
                "base_builds = false there if the series' first patch is the build fix",
            )
        if made.error:
            self.log(f"check: {gate.name}: the base does not build (base_builds = false)")
        stamp.write_text(
            json.dumps({"base": base, "gate": digest, "warnings": sorted(made.warnings)})
        )
        return made.warnings

    def _build(self, gate: Gate, out: Path, sha: str, subject: str, known: set[str]) -> GateResult:
        made = self._make(gate, out)
        new = sorted(made.warnings - known)
        return GateResult(
            gate.name,
            sha,
            subject,
            not made.error and not new,
            made.error,
            new,
            made.recompiled,
            made.seconds,
        )

    def _make(self, gate: Gate, out: Path) -> Made:
        started = time.monotonic()
        try:
            manifest = build_stage.build(
                self.config,
                tree=str(self.worktree),
                out=str(out),
                fragments=gate.fragments,
                base_config=gate.base_config,
                target=gate.target,
                arch=gate.arch,
                set_last=False,
                log=lambda _: None,
            )
            printed, compiled, error = manifest.warnings, manifest.compiled, ""
        except BuildError as e:  # what compiled before the error still counts
            printed, compiled, error = list(e.warnings), e.compiled, e.message
        except ToolkitError as e:  # refused before make ran, or make's own complaint
            printed, compiled, error = [], 0, e.message
        return Made(
            error,
            warnings("\n".join(printed), self.worktree, out),
            compiled,
            time.monotonic() - started,
        )


@dataclass(frozen=True)
class Made:
    """One build of a gate: its error (empty if it built), the warnings it printed, how many
    objects it compiled, how long it took."""

    error: str
    warnings: set[str]
    recompiled: int
    seconds: float


def check(
    config: Config,
    series: Series,
    tree: WorkTree,
    *,
    gates: Sequence[str] = (),
    log: Log = print,
) -> list[GateResult]:
    """Run the gates (all, or those named) over the series branch of `tree`."""
    chosen = Gate.load_all(config)
    if gates:
        unknown = sorted(set(gates) - {g.name for g in chosen})
        if unknown:
            raise ToolkitError(
                f"no gate {', '.join(unknown)}",
                f"gates in configs/toolkit.toml: {', '.join(g.name for g in chosen)}",
            )
        chosen = [g for g in chosen if g.name in gates]
    base_ref = f"{series.base.remote}/{series.base.branch}"
    return SeriesCheck(config, tree, log=log).run(chosen, base_ref, series.branch)


def table(results: Sequence[GateResult]) -> Table:
    """Rows: the commits, oldest first. Columns: the gates."""
    gates = list(dict.fromkeys(r.gate for r in results))
    grid = Table(title="check: every commit, every gate", title_justify="left")
    grid.add_column("commit")
    for gate in gates:
        grid.add_column(gate, justify="center")
    for sha in dict.fromkeys(r.commit for r in results):
        mine = {r.gate: r for r in results if r.commit == sha}
        first = next(iter(mine.values()))
        cells = []
        for gate in gates:
            r = mine.get(gate)
            if r is None:
                cells.append("-")
            elif r.error:
                cells.append("[bold red]BUILD FAILED[/]")
            elif r.new_warnings:
                cells.append(f"[bold red]{len(r.new_warnings)} new warning(s)[/]")
            else:
                cells.append(f"[green]ok[/] {r.recompiled} compiled, {r.seconds:.0f}s")
        grid.add_row(f"{sha[:12]} {first.subject}", *cells)
    return grid


def details(results: Sequence[GateResult]) -> list[str]:
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.gate}: {r.commit[:12]}: {r.error}")
        lines += [f"{r.gate}: {r.commit[:12]}: new warning: {w}" for w in r.new_warnings]
    return lines
