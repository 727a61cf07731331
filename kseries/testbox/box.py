"""A test box as configs/testboxes.toml describes it: where it is, how to reach it, how a new
kernel gets booted on it, and what to do when it stops answering.

Boxes are data. `[box.NAME]` tables in configs/testboxes.toml (and configs/local.toml, merged
over it) define them; `[testbox] default` names the box used without `--box`. A box with a
`[box.NAME.qemu]` table is a local QEMU box that kseries starts and stops itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kseries.config import Config, check_keys, merge, read_toml
from kseries.errors import ToolkitError
from kseries.paths import cache_dir

FILE = "testboxes.toml"
METHODS = ("kexec", "grub-reboot", "qemu")
BOX_KEYS = {
    "method",
    "host",
    "port",
    "user",
    "identity",
    "known_hosts",
    "power_cycle",
    "cmdline",
    "initrd",
    "workdir",
    "timeouts",
    "env",
    "qemu",
    "description",
    "vars",
}
QEMU_KEYS = {"cpu", "memory", "smp", "accel", "extra_args", "state_dir", "binary", "tsc_khz"}
SETTINGS_KEYS = {"default", "dmesg_ignore", "trace", "keep_warm"}
TIMEOUT_KEYS = {"connect", "boot", "test", "kexec_exec"}


@dataclass(frozen=True)
class Timeouts:
    """Seconds. `test` is the default for a test that sets none; `kexec_exec` is how long the
    foreground `kexec -e` channel is given before the tool stops waiting for it to return."""

    connect: float = 10.0
    boot: float = 180.0
    test: float = 300.0
    kexec_exec: float = 3.0


@dataclass(frozen=True)
class QemuSettings:
    """How kseries runs a local QEMU box (see kseries/testbox/qemu.py)."""

    cpu: str = "max"  # "max": TDP MMU in the guest; "qemu64,+svm": shadow MMU
    memory: str = "1G"
    smp: int = 1
    accel: str = "auto"  # auto: KVM only where it can run the guest, else TCG; or kvm, tcg
    extra_args: tuple[str, ...] = ()
    state_dir: Path | None = None  # default: ~/.cache/kseries/testbox/NAME
    binary: str = "qemu-system-x86_64"
    tsc_khz: int = -1  # under TCG: tsc_early_khz= for the guest; -1: the host's, 0: none


@dataclass(frozen=True)
class Box:
    """One test box. For a local QEMU box, host/port/identity/known_hosts are kseries' own."""

    name: str
    method: str
    host: str = "127.0.0.1"
    port: int = 22
    user: str = "root"
    identity: Path | None = None
    known_hosts: Path | None = None
    power_cycle: str = ""  # a shell command run on this machine when the box stops answering
    cmdline: str = ""  # the new kernel's command line; empty: kexec --reuse-cmdline
    initrd: Path | None = None  # passed with the kernel (kexec, grub); the QEMU box has its own
    workdir: str = "/tmp/kseries"  # where uploads go on the box
    timeouts: Timeouts = field(default_factory=Timeouts)
    env: dict[str, str] = field(default_factory=dict)  # exported to every test on this box
    vars: dict[str, str] = field(default_factory=dict)  # fills {NAME}s in the tests' args
    qemu: QemuSettings | None = None
    description: str = ""

    @property
    def is_local_qemu(self) -> bool:
        return self.qemu is not None

    @property
    def state_dir(self) -> Path:
        """Where a local QEMU box keeps its console log, keys and state."""
        if self.qemu and self.qemu.state_dir:
            return self.qemu.state_dir
        return cache_dir() / "testbox" / self.name

    def address(self, port: int | None = None) -> str:
        """user@host:port, for messages (never anything secret)."""
        return f"{self.user}@{self.host}:{port or self.port}"


def _path(value: Any, directory: Path) -> Path | None:
    if value in (None, ""):
        return None
    return (directory / Path(str(value)).expanduser()).resolve()


def parse_box(name: str, table: dict[str, Any], directory: Path, where: str) -> Box:
    """One [box.NAME] table; relative paths are taken from the configs directory."""
    check_keys(table, BOX_KEYS, where)
    qemu_table = table.get("qemu")
    method = table.get("method", "qemu" if qemu_table is not None else "")
    if method not in METHODS:
        raise ToolkitError(
            f"{where}: method {method!r} is not one of {', '.join(METHODS)}",
            'set method = "kexec", "grub-reboot" or "qemu" (qemu needs a [qemu] table)',
        )
    if method == "qemu" and qemu_table is None:
        raise ToolkitError(f'{where}: method "qemu" needs a qemu table', "add qemu = {}")
    qemu = None
    if qemu_table is not None:
        check_keys(qemu_table, QEMU_KEYS, f"{where}.qemu")
        qemu = QemuSettings(
            cpu=str(qemu_table.get("cpu", "max")),
            memory=str(qemu_table.get("memory", "1G")),
            smp=int(qemu_table.get("smp", 1)),
            accel=str(qemu_table.get("accel", "auto")),
            extra_args=tuple(str(a) for a in qemu_table.get("extra_args", ())),
            state_dir=_path(qemu_table.get("state_dir"), directory),
            binary=str(qemu_table.get("binary", "qemu-system-x86_64")),
            tsc_khz=int(qemu_table.get("tsc_khz", -1)),
        )
        if qemu.accel not in ("auto", "kvm", "tcg"):
            raise ToolkitError(f"{where}.qemu: accel must be auto, kvm or tcg", "see the file")
    timeouts_table = table.get("timeouts", {})
    check_keys(timeouts_table, TIMEOUT_KEYS, f"{where}.timeouts")
    timeouts = Timeouts(**{k: float(v) for k, v in timeouts_table.items()})
    if qemu is None:
        missing = [k for k in ("host", "identity", "known_hosts") if not table.get(k)]
        if missing:
            raise ToolkitError(
                f"{where}: a remote box needs {', '.join(missing)}",
                "see the commented example in configs/testboxes.toml",
            )
    return Box(
        name=name,
        method=method,
        host=str(table.get("host", "127.0.0.1")),
        port=int(table.get("port", 0 if qemu else 22)),
        user=str(table.get("user", "root")),
        identity=_path(table.get("identity"), directory),
        known_hosts=_path(table.get("known_hosts"), directory),
        power_cycle=str(table.get("power_cycle", "")),
        cmdline=str(table.get("cmdline", "")),
        initrd=_path(table.get("initrd"), directory),
        workdir=str(table.get("workdir", "/tmp/kseries")),
        timeouts=timeouts,
        env={str(k): str(v) for k, v in table.get("env", {}).items()},
        vars={str(k): str(v) for k, v in table.get("vars", {}).items()},
        qemu=qemu,
        description=str(table.get("description", "")),
    )


@dataclass(frozen=True)
class TestboxConfig:
    """Everything configs/testboxes.toml says: boxes, tests, recipes and defaults."""

    __test__ = False  # not a pytest class, despite the name

    data: dict[str, Any]
    directory: Path

    @classmethod
    def load(cls, config: Config) -> TestboxConfig:
        """configs/testboxes.toml, with any [testbox], [box.*], [[test]] or [recipe.*] that
        configs/local.toml has merged over it."""
        path = config.directory / FILE
        data = read_toml(path) if path.is_file() else {}
        local = config.directory / "local.toml"
        if local.is_file():
            over = read_toml(local)
            data = merge(data, {k: v for k, v in over.items() if k in SECTIONS})
        return cls(data, config.directory)

    def settings(self) -> dict[str, Any]:
        table = dict(self.data.get("testbox", {}))
        check_keys(table, SETTINGS_KEYS, f"{FILE} [testbox]")
        return table

    def box(self, name: str = "") -> Box:
        boxes = self.data.get("box", {})
        name = name or os.environ.get("KSERIES_BOX") or self.settings().get("default", "local")
        if name not in boxes:
            raise ToolkitError(
                f"no test box {name!r} in {self.directory / FILE}",
                f"boxes: {', '.join(sorted(boxes)) or 'none'}; add [box.{name}] there or "
                "in configs/local.toml",
            )
        return parse_box(name, boxes[name], self.directory, f"{FILE} [box.{name}]")

    def names(self) -> list[str]:
        return sorted(self.data.get("box", {}))


SECTIONS = ("testbox", "box", "test", "recipe")
