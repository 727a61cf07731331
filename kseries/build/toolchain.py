"""Targets as data, the tools a build needs, and the environment make runs in (distcc, ccache).

A target (`--target NAME`) is make goals, extra make variables, the tools it needs beyond the
usual ones and the artifact it leaves: configs/toolkit.toml [build.targets] names them, and a
raw object or directory of the tree is a target too.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kseries.core import run as door
from kseries.errors import ToolkitError

INSTALL_HINT = "run `bash ci/install.sh` (or `apt-get install {package}`)"
# Tools every kernel build runs, and the Debian package that has each.
TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc"}
# ... and every build of the meson kind (QEMU): configure is a shell script, meson is the venv's.
MESON_TOOLS = {"ninja": "ninja-build", "gcc": "gcc", "pkg-config": "pkgconf", "flex": "flex"}
PACKAGES = {
    **TOOLS,
    **MESON_TOOLS,
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
# A raw make goal the user may name with --target: one object or a directory of the tree.
RAW_GOAL = re.compile(r"^[\w./+-]+(?:\.(?:o|i|s|lst|ko)|/)$")
IMAGE = "arch/x86/boot/bzImage"
DISTCC_SLOTS = 4  # distcc's default per-host job limit (2 for localhost)


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


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The build's environment: English messages (they are parsed), no inherited CONFIG_."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG_", "KCONFIG_CONFIG")}
    env.update(LC_ALL="C", LANG="C")
    env.update(extra or {})
    return env
