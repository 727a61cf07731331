"""The build stage: check the inputs, configure, make, write the manifest.

The build directory defaults to ~/.cache/kseries/build/<tree-key>/ and is kept between runs, so
a rebuild is incremental. The toolkit's own files live in its `kseries/` subdirectory (log,
step counts, config stamp).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from kseries import tree as tree_stage
from kseries.build.failure import BuildError
from kseries.build.fragments import BuildConfig
from kseries.build.make import MakeRun
from kseries.build.manifest import (
    STATE_VERSION,
    FileId,
    Manifest,
    _record,
    _write_atomic,
    kernelrelease,
    sha256_file,
    utsversion,
)
from kseries.build.toolchain import (
    IMAGE,
    TOOLS,
    Target,
    _ccache_basedir,
    ccache_stats,
    check_tools,
    distcc_jobs,
)
from kseries.config import BOOLEAN, INTEGER, STRING, STRING_TABLE, STRINGS, Config, Keys, Names
from kseries.core import run as door
from kseries.core.files import exclusive, output_dir
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.paths import cache_dir

Log = Callable[[str], None]

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
            runner = MakeRun(
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


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if state.get("version") == STATE_VERSION else {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    _write_atomic(path, json.dumps({**state, "version": STATE_VERSION}, indent=2) + "\n")
