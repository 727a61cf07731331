"""The configure phase of a meson build kind (QEMU): its own `configure` with arguments,
device lists and firmware that are all data ([build.meson] of the series' toolkit.toml).

The counterpart of fragments.py's `BuildConfig` for the kernel: it says what the build is made
from (`digest`), runs configure only when that changed, and names the files the manifest
records. QEMU's configure builds its own Python venv from the interpreter it is given: the
toolkit's (whose venv has meson >= 1.5, which QEMU 10.2 needs and Debian bookworm lacks).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from kseries.build.manifest import sha256_file
from kseries.config import STRING_TABLE, STRINGS, Keys
from kseries.core import run as door
from kseries.errors import ToolkitError
from kseries.ui import heartbeat

# [build.meson]: configure's arguments, each target's device list (configure's
# --with-devices-ARCH, a path from the config directory), and the firmware files copied into
# BUILD/firmware, the `-L` directory of the built binary (a Debian source has no blobs).
MESON = Keys({"configure": STRINGS, "devices": STRING_TABLE, "firmware": STRINGS})
FIRMWARE_DIR = "firmware"
STAMP = "config-host.mak"  # what configure writes last; its sha256 is the build's config id


@dataclass(frozen=True)
class MesonConfig:
    """What a meson build is configured from: configure's arguments, device files, firmware."""

    arguments: tuple[str, ...]
    devices: tuple[tuple[str, Path], ...]  # (target arch, device list file)
    firmware: tuple[Path, ...]

    @classmethod
    def resolve(cls, table: Mapping[str, Any], directory: Path) -> MesonConfig:
        """From [build.meson], every file checked now, before any work."""
        devices = tuple(
            (arch, (directory / name).resolve()) for arch, name in table.get("devices", {}).items()
        )
        firmware = tuple(Path(name) for name in table.get("firmware", ()))
        named = [(f"devices.{arch}", path) for arch, path in devices]
        for what, path in [*named, *(("firmware", path) for path in firmware)]:
            if not path.is_file():
                raise ToolkitError(
                    f"{directory / 'toolkit.toml'}: [build.meson] {what}: {path} does not exist",
                    "install the Debian package that has it (ci/install.sh), or fix the path",
                )
        return cls(tuple(table.get("configure", ())), devices, firmware)

    def compiled_by(self, cc: str) -> MesonConfig:
        """The same configuration with configure's --cc (ccache in front of the compiler)."""
        return replace(self, arguments=(*self.arguments, f"--cc={cc}"))

    @property
    def base(self) -> str:
        """The manifest's base_config: how the build was configured."""
        return "configure " + " ".join(self.arguments)

    @property
    def inputs(self) -> list[Path]:
        """The files the build is made from besides the tree (the manifest's fragments)."""
        return [path for _, path in self.devices] + list(self.firmware)

    def digest(self) -> str:
        data = {
            "arguments": self.arguments,
            "python": sys.executable,
            "inputs": [(str(p), sha256_file(p)) for p in self.inputs],
        }
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()

    def command(self, tree: Path) -> list[str]:
        """configure's command line. A device list must be named relative to the tree's
        configs/devices/ARCH-softmmu/ and without .mak: configure refuses anything else."""
        devices = [
            f"--with-devices-{arch}="
            + os.path.relpath(path.with_suffix(""), tree / f"configs/devices/{arch}-softmmu")
            for arch, path in self.devices
        ]
        return [str(tree / "configure"), f"--python={sys.executable}", *self.arguments, *devices]

    def prepare(
        self,
        tree: Path,
        build_dir: Path,
        output: IO[str],
        state: dict[str, Any],
        log: Callable[[str], None],
        console: Console | None = None,
    ) -> Path:
        """Run configure in `build_dir` unless it already is what these inputs give, and copy
        the firmware; the file whose sha256 identifies the configuration."""
        stamp = build_dir / STAMP
        digest = self.digest()
        configured = (build_dir / "build.ninja").is_file()
        if state.get("meson", {}).get("inputs") != digest or not configured:
            log(f"build: configure ({len(self.arguments)} options)")
            cmd = self.command(tree)
            output.write(f"$ {' '.join(cmd)}\n")
            output.flush()
            build_dir.mkdir(parents=True, exist_ok=True)
            with heartbeat("configure", lambda: "running", console):
                done = door.run(
                    cmd,
                    cwd=build_dir,
                    check=False,
                    what="configure",
                    stdout=output,
                    stderr=door.STDOUT,
                )
            if not done.ok or not stamp.is_file():
                text = Path(output.name).read_text(errors="replace")
                last = text.strip().splitlines()[-1:] or ["?"]
                raise ToolkitError(
                    f"configure failed: {last[0][:160]}",
                    f"full log: {output.name}; a missing library names its -dev package "
                    "(bash ci/install.sh installs them)",
                )
            state["meson"] = {"inputs": digest}
        firmware = build_dir / FIRMWARE_DIR
        firmware.mkdir(exist_ok=True)
        for path in self.firmware:
            shutil.copyfile(path, firmware / path.name)
        return stamp


def release(tree: Path) -> str:
    """ "QEMU 10.2.2": the tree's VERSION file."""
    version = tree / "VERSION"
    return f"QEMU {version.read_text().strip()}" if version.is_file() else ""


def check_meson_tree(path: Path) -> None:
    if not (path / "configure").is_file() or not (path / "meson.build").is_file():
        raise ToolkitError(
            f"tree {path} is not a meson tree (no configure or meson.build)",
            "pass --tree with a QEMU source checkout, or set tree.path in configs/qemu/local.toml",
        )
