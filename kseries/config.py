"""Load the project's TOML configuration: tracked defaults plus an untracked local override.

Facts live in configs/: the series definition (series.toml), the toolkit's settings
(toolkit.toml) and, for a user's own tree, remote or boxes, configs/local.toml, which is
merged over both and never committed.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kseries.errors import ToolkitError
from kseries.paths import PROJECT

CONFIG_FILES = ("series.toml", "toolkit.toml", "local.toml")


def config_dir() -> Path:
    """$KSERIES_CONFIG_DIR, else the project's configs/ (tests point it at a scratch project)."""
    return Path(os.environ.get("KSERIES_CONFIG_DIR") or PROJECT / "configs")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ToolkitError(f"{path}: {e}", "fix the TOML syntax at that line") from e
    except UnicodeDecodeError as e:
        raise ToolkitError(
            f"{path}: not UTF-8: byte {e.object[e.start]:#04x} at offset {e.start}",
            "save the file as UTF-8",
        ) from None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge tables; anything else in `over` replaces what `base` had."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Config:
    """The merged configuration, plus where it came from, so errors can name the file."""

    data: dict[str, Any]
    directory: Path

    @classmethod
    def load(cls, directory: Path | None = None) -> Config:
        directory = directory or config_dir()
        if not (directory / "series.toml").is_file():
            raise ToolkitError(
                f"{directory / 'series.toml'}: no series definition",
                "run from the project checkout or set KSERIES_CONFIG_DIR",
            )
        data: dict[str, Any] = {}
        for name in CONFIG_FILES:
            path = directory / name
            if path.is_file():
                data = merge(data, read_toml(path))
        return cls(data, directory)

    def table(self, name: str) -> dict[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise ToolkitError(f"{self.directory}: [{name}] must be a table", "see configs/")
        return value

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A value by dotted name, e.g. "tree.path"; `default` when unset or empty."""
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return default if node in ("", None) else node

    def path(self, dotted: str) -> Path | None:
        """A path setting, relative paths taken from the configs directory, ~ expanded."""
        value = self.setting(dotted)
        if value is None:
            return None
        return (self.directory / Path(str(value)).expanduser()).resolve()


def check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    """Refuse a table with a setting nobody reads: a typo must not be silently ignored."""
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ToolkitError(
            f"{where}: unknown setting {', '.join(unknown)}",
            f"known settings: {', '.join(sorted(allowed))}",
        )
