"""The kernel under test: a bzImage, what it claims to be, and the build that made it.

`invoke build` writes a manifest next to each bzImage (kseries/build/manifest.py) and points
~/.cache/kseries/build/last.json at the newest (`last_manifest()` reads that pointer). This
module reads a manifest through one small, tolerant function (`read_manifest`), so the
test-box stage depends only on the few fields it needs: the image's path, sha256,
kernelrelease and utsversion, plus the tree, branch and commit for the report (send finds the
newest report of a branch by them). It also reads the version
string every x86 bzImage carries in its setup header, which identifies a bare image without a
manifest and catches a manifest that no longer matches the image it names (a rebuild since).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kseries.build.manifest import last_manifest
from kseries.errors import ToolkitError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Kernel:
    """A bzImage's bytes (read once: what is hashed is what is uploaded) and its identity."""

    path: Path
    data: bytes
    sha256: str
    kernelrelease: str
    utsversion: str  # "#3 SMP PREEMPT Thu Nov 26 14:26:29 UTC 2026"
    manifest: Path | None = None
    tree: str = ""
    branch: str = ""  # the tree's branch it was built from ("" for a detached checkout)
    commit: str = ""
    dirty: bool = False

    @property
    def label(self) -> str:
        source = f" from {Path(self.tree).name} {self.commit[:12]}" if self.commit else ""
        return f"{self.kernelrelease} {self.utsversion}{source}"

    def matches(self, proc_version: str) -> bool:
        """Whether a box's /proc/version is this build: "Linux version RELEASE (...) UTS"."""
        text = proc_version.strip()
        return text.startswith(f"Linux version {self.kernelrelease} ") and text.endswith(
            self.utsversion
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "bzimage": str(self.path),
            "sha256": self.sha256,
            "size": len(self.data),
            "kernelrelease": self.kernelrelease,
            "utsversion": self.utsversion,
            "manifest": str(self.manifest) if self.manifest else None,
            "tree": self.tree,
            "branch": self.branch,
            "commit": self.commit,
            "dirty": self.dirty,
        }


def image_version(data: bytes) -> tuple[str, str]:
    """(kernelrelease, utsversion) from a bzImage's setup header (boot protocol >= 2.0: the
    kernel_version pointer at 0x20e, relative to 0x200), e.g. ("7.2.13+", "#3 SMP ...")."""
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        raise ToolkitError("not an x86 bzImage (no HdrS setup header)", "pass a bzImage")
    offset = struct.unpack_from("<H", data, 0x20E)[0] + 0x200
    text = data[offset : offset + 512].split(b"\0", 1)[0].decode(errors="replace")
    release = text.split(" ", 1)[0]
    hash_at = text.find(" #")
    return release, text[hash_at + 1 :] if hash_at >= 0 else ""


def read_manifest(path: Path) -> dict[str, Any]:
    """The few manifest fields this stage uses, tolerating shape changes in the rest:
    {"bzimage": path, "sha256", "kernelrelease", "utsversion", "tree", "branch", "commit",
    "dirty"}.
    `bzimage` may be an object {path, sha256, size} (kseries.build's FileId) or a plain path."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ToolkitError(f"build manifest {path}: {e}", "run `invoke build` again") from e
    image = data.get("image") or data.get("bzimage")  # the build manifest's, or an older one's
    sha = data.get("bzimage_sha256") or data.get("sha256")
    if isinstance(image, dict):
        sha = image.get("sha256", sha)
        image = image.get("path")
    if not image:
        raise ToolkitError(
            f"build manifest {path} names no bzImage (target {data.get('target', '?')})",
            "build the kernel image: invoke build --target bzImage",
        )
    image_path = Path(str(image))
    if not image_path.is_absolute():
        image_path = path.parent / image_path
    return {
        "bzimage": image_path,
        "sha256": sha or "",
        "kernelrelease": str(data.get("kernelrelease") or ""),
        "utsversion": str(data.get("utsversion") or ""),
        "tree": str(data.get("tree") or ""),
        "branch": str(data.get("branch") or ""),
        "commit": str(data.get("commit") or ""),
        "dirty": bool(data.get("dirty", False)),
    }


def load(spec: str = "") -> Kernel:
    """The kernel to test: `spec` is a manifest (.json), a bzImage (its manifest.json next to
    it is used when present), or empty for the last `invoke build`."""
    path = Path(spec).expanduser().resolve() if spec else last_manifest()
    if not path.is_file():
        raise ToolkitError(f"kernel {path}: no such file", "pass a bzImage or a manifest.json")
    manifest: Path | None = None
    facts: dict[str, Any] = {}
    if path.suffix == ".json":
        manifest, facts = path, read_manifest(path)
        image = facts["bzimage"]
    else:
        image = path
        if (path.parent / MANIFEST).is_file():
            candidate = read_manifest(path.parent / MANIFEST)
            if Path(candidate["bzimage"]).resolve() == path:
                manifest, facts = path.parent / MANIFEST, candidate
    try:
        data = Path(image).read_bytes()
    except OSError as e:
        raise ToolkitError(f"kernel image {image}: {e.strerror}", "run `invoke build`") from e
    sha = hashlib.sha256(data).hexdigest()
    release, uts = image_version(data)
    if manifest is not None:
        if facts["sha256"] and facts["sha256"] != sha:
            raise ToolkitError(
                f"{image} changed since {manifest} was written (sha256 {sha[:12]}, manifest "
                f"{facts['sha256'][:12]})",
                "a build is running or was interrupted: run `invoke build` and try again",
            )
        for key, seen in (("kernelrelease", release), ("utsversion", uts)):
            if facts[key] and facts[key] != seen:
                raise ToolkitError(
                    f"{manifest} says {key} {facts[key]!r}, but {image} says {seen!r}",
                    "run `invoke build` again",
                )
    if not release or not uts:
        raise ToolkitError(f"{image}: no version string in the image", "pass a real bzImage")
    return Kernel(
        path=Path(image),
        data=data,
        sha256=sha,
        kernelrelease=release,
        utsversion=uts,
        manifest=manifest,
        tree=facts.get("tree", ""),
        branch=facts.get("branch", ""),
        commit=facts.get("commit", ""),
        dirty=facts.get("dirty", False),
    )
