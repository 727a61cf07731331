"""The build stage: check the inputs, configure, make, write the manifest.

The build directory defaults to ~/.cache/kseries/build/<tree-key>/ and is kept between runs, so
a rebuild is incremental. The toolkit's own files live in its `kseries/` subdirectory (log,
step counts, config stamp).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from kseries import paths
from kseries import tree as tree_stage
from kseries.build.failure import BuildError
from kseries.build.fragments import BuildConfig
from kseries.build.make import MakeRun, Outcome
from kseries.build.manifest import (
    STATE_VERSION,
    FileId,
    Manifest,
    _record,
    kernelrelease,
    sha256_file,
    utsversion,
)
from kseries.build.meson import MESON, MesonConfig, check_meson_tree, release
from kseries.build.toolchain import (
    IMAGE,
    MESON_TOOLS,
    TOOLS,
    Target,
    _ccache_basedir,
    ccache_stats,
    check_tools,
    distcc_jobs,
)
from kseries.config import (
    BOOLEAN,
    INTEGER,
    STRING,
    STRING_TABLE,
    STRINGS,
    Config,
    Keys,
    Kind,
    Names,
)
from kseries.core import run as door
from kseries.core.files import exclusive, output_dir, write_atomic
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree

Log = Callable[[str], None]

# configs/toolkit.toml [build]: the defaults of `invoke build`, and what each --target makes.
KINDS = ("kbuild", "meson")  # the kernel's make O=, or a meson tree's configure + ninja
BUILD = Keys(
    {
        "kind": Kind("kbuild or meson", lambda v: v in KINDS, '"meson"'),
        "meson": MESON,  # the meson kind's configure arguments, device lists, firmware
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


def meson_config(config: Config) -> MesonConfig | None:
    """The series' [build.meson] configuration (every file checked), or None for a kernel
    build (kind = "kbuild", the default)."""
    settings = config.table("build", BUILD)
    if settings.get("kind", "kbuild") != "meson":
        return None
    return MesonConfig.resolve(settings.get("meson", {}), config.directory)


def build(
    config: Config,
    *,
    tree: WorkTree | str = "",
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
    return Build(
        config,
        tree=tree,
        out=out,
        fragments=fragments,
        base_config=base_config,
        jobs=jobs,
        target=target,
        distcc=distcc,
        arch=arch,
        verbose=verbose,
        log=log,
        console=console,
        set_last=set_last,
    ).run()


class Build:
    """One build of a tree's checked-out commit, tuxmake-style: the constructor checks every
    input (config inputs, target, tools, build directory, tree), so that a wrong one is refused
    before any work; `run()` then takes the build directory's lock and runs the timed phases
    (configure, make, manifest). The arguments are build()'s.
    """

    def __init__(
        self,
        config: Config,
        *,
        tree: WorkTree | str = "",
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
    ) -> None:
        self.started = time.monotonic()  # the manifest's wall time counts the checks too
        self.log, self.verbose, self.console, self.set_last = log, verbose, console, set_last
        settings = config.table("build", BUILD)
        meson = meson_config(config)
        self.meson = meson is not None
        self.config: BuildConfig | MesonConfig
        if meson is not None:
            if fragments or base_config or arch or distcc:
                raise ToolkitError(
                    "--fragments, --base-config, --arch and --distcc are for kernel builds",
                    "this series' build is configured by [build.meson] in its toolkit.toml",
                )
            self.config = meson
        else:
            self.config = BuildConfig.resolve(
                base_config or settings.get("base_config") or "tinyconfig",
                list(fragments) or list(settings.get("fragments", [])),
                config.directory,
                arch,
            )
        self.target = Target.resolve(
            target or settings.get("target") or "bzImage", settings.get("targets", {})
        )
        self.hosts = distcc or settings.get("distcc_hosts", "")
        use_ccache = bool(
            not self.hosts and settings.get("ccache", True) and shutil.which("ccache")
        )
        tools = MESON_TOOLS if self.meson else TOOLS
        check_tools([*tools, *self.target.needs, *(["distcc"] if self.hosts else [])])
        chosen_dir = output_dir(Path(out)).resolve() if out else None  # refused before any work
        # A work tree is used as it is; a path (--tree, or empty for the configured or the
        # default tree) is opened only now, after every other input was checked.
        self.work = tree if isinstance(tree, WorkTree) else tree_stage.open_tree(config, tree, log)
        self.tree = self.work.path
        (check_meson_tree if self.meson else check_kernel_tree)(self.tree)
        self.build_dir = chosen_dir or paths.build_dir(self.tree, config.series_key)
        if self.build_dir == self.tree or self.tree in self.build_dir.parents:
            raise ToolkitError(
                f"build directory {self.build_dir} is inside the tree {self.tree}",
                "pass --out with a directory outside the tree (default: ~/.cache)",
            )
        cpus = os.cpu_count() or 1
        self.jobs = jobs or int(settings.get("jobs") or 0) or max(cpus, distcc_jobs(self.hosts))
        self.env: dict[str, str] = {}
        self.make_vars: list[str] = [f"ARCH={arch}"] if arch else []
        if self.hosts:
            self.make_vars.append("CC=distcc gcc")
            self.env["DISTCC_HOSTS"] = self.hosts
        elif use_ccache:
            if isinstance(self.config, MesonConfig):
                # QEMU's configure writes its --cc into meson's native file, word by word
                self.config = self.config.compiled_by("ccache gcc")
            else:
                self.make_vars.append("CC=ccache gcc")
            self.env.update(_ccache_basedir(self.tree, self.build_dir))
        self.own = self.build_dir / "kseries"  # the toolkit's files: lock, log, state, stats
        self.stats_log = self.own / "ccache-stats.log" if use_ccache else None
        self.seconds: dict[str, float] = {}  # each phase's duration, once it has run
        self.config_file = self.build_dir / ".config"  # the meson kind's: configure's output

    def run(self) -> Manifest:
        """Configure, make, write the manifest; return it (see build())."""
        self.own.mkdir(parents=True, exist_ok=True)
        with (
            exclusive(
                self.own / "lock", f"build: waiting for another build in {self.build_dir}", self.log
            ),
            _Source(self.work) as source,
        ):
            state = _read_state(self.own / "state.json")
            with (self.own / "build.log").open("w") as log_file:
                log_file.write(f"# kseries build of {self.tree} in {self.build_dir}\n")
                with self._phase("configure"):
                    config_sha = self._configure(log_file, state)
                with self._phase("make"):
                    key, outcome = self._make(log_file, state, config_sha)
            with self._phase("manifest"):
                state.setdefault("steps", {})[key] = len(outcome.steps)
                state.setdefault("built", {})[self.target.name] = config_sha
                _write_state(self.own / "state.json", state)
                return _record(
                    self._manifest(source, outcome), self.target, self.build_dir, self.set_last
                )

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - started, 2)

    def _configure(self, log_file: IO[str], state: dict[str, Any]) -> str:
        """BUILD/.config from the config inputs (kept if they have not changed), or the meson
        kind's configure; the sha256 of the configuration it left."""
        if isinstance(self.config, MesonConfig):
            made = self.config.prepare(
                self.tree, self.build_dir, log_file, state, self.log, self.console
            )
        else:
            made = self.build_dir / ".config"
            self.config.prepare(
                self.tree, self.build_dir, self.make_vars, log_file, state, self.log
            )
        self.config_file = made
        _write_state(self.own / "state.json", state)
        return sha256_file(made)

    def _make(
        self, log_file: IO[str], state: dict[str, Any], config_sha: str
    ) -> tuple[str, Outcome]:
        """The make run, its progress bar sized by the step count of the last run like it
        (same config and target, full or incremental); that run's key and outcome."""
        built_before = state.get("built", {}).get(self.target.name) == config_sha
        key = f"{config_sha[:16]}:{self.target.name}:{'incremental' if built_before else 'full'}"
        if self.stats_log:
            self.stats_log.write_text("")
            self.env["CCACHE_STATSLOG"] = str(self.stats_log)
        runner = MakeRun(
            self.tree,
            self.build_dir,
            self.target,
            jobs=self.jobs,
            make_vars=self.make_vars,
            env=self.env,
            log_file=log_file,
            verbose=self.verbose,
            console=self.console,
            expected=state.get("steps", {}).get(key, 0),
            tool="ninja" if self.meson else "make",
        )
        try:
            return key, runner.run()
        except BuildError as e:
            for line in e.context:
                self.log(f"  {line}")
            raise

    def _manifest(self, source: _Source, outcome: Outcome) -> Manifest:
        if isinstance(self.config, MesonConfig):
            image = self.build_dir / self.target.artifact
            version, uts = release(self.tree), ""
            inputs = [(p.name, p) for p in self.config.inputs]
        else:
            image = self.build_dir / IMAGE
            version, uts = kernelrelease(self.tree, self.build_dir), utsversion(self.build_dir)
            inputs = [(f.name, f.path) for f in self.config.fragments]
        return Manifest(
            tree=str(self.tree),
            branch=source.branch,
            commit=source.commit,
            dirty=source.dirty(),
            kernelrelease=version,
            utsversion=uts,
            target=self.target.name,
            image=FileId.of(image) if image.is_file() else None,
            config=FileId.of(self.config_file),
            base_config=self.config.base,
            fragments=[
                {"name": name, "path": str(path), "sha256": sha256_file(path)}
                for name, path in inputs
            ],
            wall_time_s=round(time.monotonic() - self.started, 2),
            ccache=ccache_stats(self.stats_log) if self.stats_log else None,
            distcc_hosts=self.hosts,
            jobs=self.jobs,
            build_dir=str(self.build_dir),
            log=str(outcome.log),
            built_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            warnings=list(outcome.warnings),
            compiled=outcome.compiled,
        )


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


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if state.get("version") == STATE_VERSION else {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    write_atomic(path, json.dumps({**state, "version": STATE_VERSION}, indent=2) + "\n")
