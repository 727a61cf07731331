"""The manifest: the JSON record written next to the kernel image (tree, branch, commit, kernel
release, utsversion, image and config sha256, fragments, wall time, ccache hit rate), enough to
prove which kernel a test box runs. ~/.cache/kseries/build/last.json points at the newest."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kseries.build.toolchain import IMAGE, Target, _env
from kseries.core import run as door
from kseries.core.files import write_atomic
from kseries.errors import ToolkitError
from kseries.paths import last_build_pointer

STATE_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    image: FileId | None  # the artifact: a bzImage, or a meson build's binary
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
    warnings: list[str] = field(default_factory=list)  # gcc's warning lines, as printed
    compiled: int = 0  # objects this run compiled (0: nothing to rebuild)
    path: str = ""  # where this manifest is stored (not part of the JSON)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        return json.dumps({"version": STATE_VERSION, **data}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, path: str = "") -> Manifest:
        data = json.loads(text)
        data.pop("version", None)
        if "bzimage" in data:  # written before the meson kind: the artifact was a bzImage
            data["image"] = data.pop("bzimage")
        for key in ("image", "config"):
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
        write_atomic(path, self.to_json())
        return Manifest.from_json(self.to_json(), str(path))


def last_manifest() -> Path:
    """Where the manifest of the newest kernel image `invoke build` made is (build/last.json
    points at it): the test boxes' default kernel."""
    pointer = last_build_pointer()
    try:
        data = json.loads(pointer.read_text())
    except (OSError, ValueError):
        raise ToolkitError(
            f"no kernel built yet ({pointer} is missing or unreadable)",
            "run `invoke build`, or pass --kernel PATH",
        ) from None
    manifest = data.get("manifest")
    if manifest:
        return Path(manifest)
    image = data.get("bzimage")
    if image:
        return Path(image).parent / "manifest.json"
    raise ToolkitError(f"{pointer} names no manifest", "run `invoke build` again")


def last_build() -> Manifest:
    """The manifest of the newest kernel image `invoke build` made."""
    return Manifest.load(last_manifest())


def summary(manifest: Manifest) -> str:
    """What `invoke build` prints on success."""
    lines = []
    if manifest.image:
        size = manifest.image.size / (1 << 20)
        lines.append(f"built {manifest.image.path} ({size:.1f} MiB)")
        lines.append(f"  sha256   {manifest.image.sha256}")
    else:
        lines.append(f"built {manifest.target} in {manifest.build_dir}")
    if manifest.utsversion:
        lines.append(f"  kernel   {manifest.kernelrelease} {manifest.utsversion}")
    else:  # a meson build (QEMU): its release, no kernel utsversion
        lines.append(f"  release  {manifest.kernelrelease}")
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
    if target.artifact != IMAGE or manifest.image is None:
        return manifest.write(build_dir / "kseries" / f"manifest-{_safe(target.name)}.json")
    manifest = manifest.write((build_dir / IMAGE).parent / "manifest.json")
    if set_last:
        pointer = {
            "manifest": manifest.path,
            "bzimage": manifest.image.path,
            "kernelrelease": manifest.kernelrelease,
            "utsversion": manifest.utsversion,
        }
        write_atomic(last_build_pointer(), json.dumps(pointer, indent=2) + "\n")
    return manifest


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)
