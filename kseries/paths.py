"""Where the toolkit keeps things: the project checkout and the cache layout.

Every path under ~/.cache/kseries is named here, with the one key that tells two trees'
entries apart, so a stage never builds a cache path of its own. The layout:

    default-tree/          the embedded tree (linux/) and its bare remote
    default-tree-PACKAGE/  another series' embedded tree from a Debian source package (qemu/)
    build/TREE-KEY[-SERIES]/  `invoke build`'s O= directories; build/last.json: the newest image
    check/TREE-KEY[-SERIES]/  the check stage's gate build directories and worktrees
    testbox/NAME/          a local box's console log, keys and state
    testbox/build/TREE-KEY/  the test programs built against a tree
    testbox/compare/TREE-KEY/  the --compare reference's worktree, and a build per series
    testbox/lava/          the LAVA ramdisk and its keys
    distro/SUITE/          the grub-reboot box's Debian disk image

Two series may share one tree (the QEMU series and the pair box's outer QEMU both build the
embedded QEMU tree, configured differently): their build directories carry the series' key.
"""

import hashlib
import os
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """~/.cache/kseries (or $XDG_CACHE_HOME/kseries): big downloads and build trees live here."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kseries"


def tree_key(path: Path) -> str:
    """A cache directory name per tree: its name plus a short hash of its path, so two
    checkouts called linux/ never share a build directory."""
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def default_tree_dir(source_package: str = "") -> Path:
    """The kernel's default tree, or (a source package's name) another series' tree."""
    name = f"default-tree-{source_package}" if source_package else "default-tree"
    return cache_dir() / name


def series_suffix(series: str) -> str:
    """What tells two series' build directories of one tree apart ("" for the default series,
    whose directories keep their plain tree key)."""
    return f"-{series}" if series else ""


def build_dir(tree: Path, series: str = "") -> Path:
    """The default O= directory of `invoke build` of `series` in `tree`."""
    return cache_dir() / "build" / (tree_key(tree) + series_suffix(series))


def last_build_pointer() -> Path:
    """build/last.json: which manifest the newest bzImage build wrote (the boxes' default)."""
    return cache_dir() / "build" / "last.json"


def check_dir(tree: Path, series: str = "") -> Path:
    return cache_dir() / "check" / (tree_key(tree) + series_suffix(series))


def worktree_dir(root: Path, tree: Path) -> Path:
    """Where a stage under `root` keeps its detached worktree of `tree`: laid out like
    ~/.cache/kseries/{default-tree/linux,build/NAME} (default-tree-qemu/qemu for QEMU), as the
    build stage makes ccache hash paths relative to the common parent, so the two share hits."""
    return root / tree.parent.name / tree.name


def testbox_dir(name: str = "") -> Path:
    """testbox/: what all local boxes share (keys, initramfs); testbox/NAME: one box's state."""
    return cache_dir() / "testbox" / name if name else cache_dir() / "testbox"


def test_programs_dir(tree: Path | None) -> Path:
    """Where the test programs of `tree` are built (`none-none`: programs needing no tree)."""
    return testbox_dir("build") / (tree_key(tree) if tree else "none-none")


def compare_dir(tree: Path) -> Path:
    return testbox_dir("compare") / tree_key(tree)


def lava_dir() -> Path:
    return testbox_dir("lava")


def distro_dir(suite: str) -> Path:
    return cache_dir() / "distro" / suite
