"""Load the project's TOML configuration: tracked defaults plus an untracked local override.

Facts live in configs/: the series definition (series.toml), the toolkit's settings
(toolkit.toml), the test boxes (testboxes.toml) and, for a user's own tree, remote or boxes,
configs/local.toml, which is merged over them and never committed.

Every table is read against a schema that the stage owning it declares (`Keys`, `Names`,
`Rows` of `Kind`s): an unknown key or a value of the wrong type is one error line naming the
file it came from (local.toml or the tracked file), the table and the key, never a silently
ignored setting or a traceback.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from kseries.errors import ToolkitError
from kseries.paths import PROJECT

# The top-level tables each tracked file may hold; local.toml may hold any of them.
TABLES = {
    "series.toml": ("series", "base", "people", "patch"),
    "toolkit.toml": ("tree", "default_tree", "build", "check", "send", "review"),
    "review.toml": ("sent", "trailer"),
    "testboxes.toml": ("testbox", "box", "test", "recipe", "pipeline"),
}
LOCAL = "local.toml"
ALL_TABLES = tuple(name for tables in TABLES.values() for name in tables)  # local.toml's
CONFIG_FILES = ("series.toml", "toolkit.toml", "review.toml", LOCAL)


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


def series_directory(home: Path, name: str) -> Path:
    """The config directory of series `name`: configs/NAME/ if it holds a series.toml, else
    configs/ itself when `name` is empty or the default series' own [series] name."""
    if not name:
        return home
    if "/" not in name and name not in (".", "..") and (home / name / "series.toml").is_file():
        return home / name
    default = home / "series.toml"
    own = read_toml(default).get("series", {}).get("name") if default.is_file() else None
    if name == own:
        return home
    others = sorted(p.parent.name for p in home.glob("*/series.toml"))
    raise ToolkitError(
        f"--series {name}: no such series ({home / name / 'series.toml'} does not exist)",
        f"series here: {', '.join([own or '(the default)', *others])}",
    )


# --- schemas ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A setting's type: the test a value must pass, its name in messages, an example."""

    expected: str
    accepts: Callable[[Any], bool]
    example: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int in Python


def _is_date(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsedate_to_datetime(value)
    except ValueError:
        return False
    return True


STRING = Kind("a string", lambda v: isinstance(v, str), '"..."')
INTEGER = Kind("an integer", _is_int, "1")
NUMBER = Kind("a number", lambda v: _is_int(v) or isinstance(v, float), "10")
BOOLEAN = Kind("true or false", lambda v: isinstance(v, bool), "true")
STRINGS = Kind(
    "a list of strings",
    lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    '["...", "..."]',
)
DATE = Kind("an RFC 2822 date", _is_date, '"Fri, 9 Aug 2024 20:51:58 +0000"')
ANY_TABLE = Kind("a table", lambda v: isinstance(v, dict), "{ ... }")


@dataclass(frozen=True)
class Keys:
    """A table with fixed keys, each with its spec; any other key is refused."""

    keys: Mapping[str, Spec]


@dataclass(frozen=True)
class Names:
    """A table whose keys the user names ([people.KEY], env = {...}): each value is `spec`."""

    spec: Spec


@dataclass(frozen=True)
class Rows:
    """An array of tables ([[patch]]), each a `table`."""

    table: Keys


Spec = Kind | Keys | Names | Rows
STRING_TABLE = Names(STRING)


def _describe(value: Any) -> str:
    """A found value as a message names it: its TOML type and, for a scalar, the value."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {value}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML dates and times


@dataclass(frozen=True)
class Source:
    """One configuration file as read, kept whole so an error can name the file a value is
    from; `tables` are the top-level tables it may hold."""

    path: Path
    data: dict[str, Any]
    tables: tuple[str, ...]

    @classmethod
    def read(cls, path: Path, tables: tuple[str, ...]) -> Source:
        data = read_toml(path)
        for name in data:
            if name not in tables:
                raise ToolkitError(
                    f"{path}: unknown table [{name}]",
                    f"tables in {path.name}: {', '.join(tables)}",
                )
        return cls(path, data, tables)

    def has(self, keys: tuple[str | int, ...]) -> bool:
        node: Any = self.data
        for key in keys:
            if isinstance(key, int):
                if not isinstance(node, list) or key >= len(node):
                    return False
            elif not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True


@dataclass(frozen=True)
class Where:
    """A table's place: its keys in the files it is merged from and its name in messages
    ("[box.local]", "[[patch]] #2"). Without sources (a table built in code) the label says
    it all."""

    label: str
    keys: tuple[str | int, ...] = ()
    sources: tuple[Source, ...] = ()

    def file(self, key: str | None = None) -> str:
        """The file the setting `key` (or, when it is unset, this table) comes from: the last
        one that has it, else the tracked file this table belongs in."""
        wanted = (*self.keys, key) if key is not None else self.keys
        for end in range(len(wanted), 0, -1):
            for source in reversed(self.sources):
                if source.has(wanted[:end]):
                    return str(source.path)
        home = [s for s in self.sources if wanted and wanted[0] in s.tables]
        return str(home[0].path) if home else ""

    def error(self, key: str | None, problem: str, hint: str) -> ToolkitError:
        """`FILE [table]: problem`, FILE being where `key` came from."""
        place = " ".join(p for p in (self.file(key), self.label) if p)
        return ToolkitError(f"{place}: {problem}", hint)

    def table(self, key: str) -> Where:
        """The table under `key`: [a.b] in [a]; in a row, "[[test]] #3 soak"."""
        if not self.label:
            label = f"[{key}]"
        elif self.label.endswith("]") and not self.label.startswith("[["):
            label = f"{self.label[:-1]}.{key}]"
        else:
            label = f"{self.label} {key}"
        return Where(label, (*self.keys, key), self.sources)

    def rows(self, key: str) -> Where:
        """The array of tables under `key`: "[[check.gate]]" in [check]."""
        name = f"{self.label[1:-1]}.{key}" if self.label else key
        return Where(f"[[{name}]]", (*self.keys, key), self.sources)

    def row(self, key: str, index: int) -> Where:
        """Entry `index` (from 0) of the array of tables under `key`: "[[check.gate]] #1"."""
        rows = self.rows(key)
        return Where(f"{rows.label} #{index + 1}", (*rows.keys, index), self.sources)

    def check(self, spec: Keys | Names, table: Any) -> None:
        """Refuse `table`, the table here, unless every key is known and every value of the
        type its spec says."""
        if not isinstance(table, dict):
            raise self.error(None, f"must be a table, not {_describe(table)}", "see configs/")
        for key, value in table.items():
            if isinstance(spec, Names):
                self.value(key, spec.spec, value)
            elif key in spec.keys:
                self.value(key, spec.keys[key], value)
            else:
                raise self.error(
                    key, f"unknown setting {key}", f"known settings: {', '.join(spec.keys)}"
                )

    def value(self, key: str, spec: Spec, value: Any) -> None:
        """Refuse `value`, the setting `key` of this table, unless it is what `spec` says."""
        if isinstance(spec, Kind):
            if not spec.accepts(value):
                raise self.error(
                    key,
                    f"{key} must be {spec.expected}, not {_describe(value)}",
                    f"write it as {key} = {spec.example}",
                )
        elif isinstance(spec, Rows):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise self.error(
                    key,
                    f"{key} must be an array of tables, not {_describe(value)}",
                    f"write each entry as a [[{key}]] table",
                )
            for index, row in enumerate(value):
                self.row(key, index).check(spec.table, row)
        elif isinstance(value, dict):
            self.table(key).check(spec, value)
        else:
            raise self.error(
                key,
                f"{key} must be a table, not {_describe(value)}",
                f"write it as {key} = {{ ... }}",
            )


@dataclass(frozen=True)
class Config:
    """The merged configuration, plus each file as read, so errors can name the file.

    A series is a config directory: the default series (the kernel's) is configs/ itself,
    another series NAME is configs/NAME/ with its own series.toml, toolkit.toml, review.toml
    and local.toml. The test boxes (testboxes.toml) are configs/'s, shared by every series."""

    data: dict[str, Any]
    directory: Path
    sources: tuple[Source, ...] = ()
    home: Path | None = None  # configs/, when `directory` is another series' configs/NAME/

    @classmethod
    def load(cls, directory: Path | None = None, series: str = "") -> Config:
        """The configuration of `series` (a directory name under configs/, or the default
        series' [series] name; empty: the default series)."""
        home = directory or config_dir()
        directory = series_directory(home, series)
        if not (directory / "series.toml").is_file():
            raise ToolkitError(
                f"{directory / 'series.toml'}: no series definition",
                "run from the project checkout or set KSERIES_CONFIG_DIR",
            )
        sources = [
            Source.read(directory / name, TABLES.get(name, ALL_TABLES))
            for name in CONFIG_FILES
            if (directory / name).is_file()
        ]
        return replace(cls.of(directory, sources), home=home if directory != home else None)

    def reload(self) -> Config:
        """The same series' configuration read again (after a stage edited its files)."""
        return Config.load(self.configs, self.series_key)

    @property
    def configs(self) -> Path:
        """The project's configs/ directory (the default series', and the boxes')."""
        return self.home or self.directory

    @property
    def project(self) -> Path:
        """The project checkout: configs/, patches/, templates/, out/."""
        return self.configs.parent

    @property
    def series_key(self) -> str:
        """The series' directory under configs/ ("" for the default series): its patches and
        templates are patches/KEY/ and templates/KEY/."""
        return "" if self.home is None else self.directory.relative_to(self.home).as_posix()

    @classmethod
    def of(cls, directory: Path, sources: list[Source]) -> Config:
        """The configuration `sources` make, each merged over the ones before it."""
        data: dict[str, Any] = {}
        for source in sources:
            data = merge(data, source.data)
        return cls(data, directory, tuple(sources))

    def source(self, name: str) -> Source | None:
        return next((s for s in self.sources if s.path.name == name), None)

    @property
    def where(self) -> Where:
        """The top level, from which each table's Where is made."""
        return Where("", (), self.sources)

    def table(self, name: str, spec: Spec | None = None) -> Any:
        """The merged table `name` (an empty one when unset), checked against `spec`: the
        schema the stage that reads it declares."""
        value = self.data.get(name, [] if isinstance(spec, Rows) else {})
        if spec is None:
            spec = ANY_TABLE
        self.where.value(name, spec, value)
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
