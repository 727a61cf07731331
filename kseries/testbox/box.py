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

from kseries.config import (
    ALL_TABLES,
    BOOLEAN,
    INTEGER,
    LOCAL,
    NUMBER,
    STRING,
    STRING_TABLE,
    STRINGS,
    TABLES,
    Config,
    Keys,
    Names,
    Source,
    Where,
)
from kseries.errors import ToolkitError
from kseries.paths import testbox_dir
from kseries.testbox import lava

FILE = "testboxes.toml"
KVM_MODULES = ("kvm", "kvm_amd", "kvm_intel")
METHODS = ("kexec", "grub-reboot", "qemu")
QEMU = Keys(
    {
        "cpu": STRING,
        "memory": STRING,
        "smp": INTEGER,
        "accel": STRING,
        "extra_args": STRINGS,
        "state_dir": STRING,
        "binary": STRING,
        "tsc_khz": INTEGER,
        "tcg_thread": STRING,
    }
)
# qemu.binary = "series:NAME": the QEMU that series builds (configs/NAME/), built at its tip.
SERIES_BINARY = "series:"
# The QEMU settings that take one of a few words, and those words.
QEMU_CHOICES = {"accel": ("auto", "kvm", "tcg"), "tcg_thread": ("multi", "single")}
BOX = Keys(
    {
        "method": STRING,
        "host": STRING,
        "port": INTEGER,
        "user": STRING,
        "identity": STRING,
        "known_hosts": STRING,
        "power_cycle": STRING,
        "console_log": STRING,
        "cmdline": STRING,
        "initrd": STRING,
        "workdir": STRING,
        "timeouts": Keys(dict.fromkeys(("connect", "boot", "test", "kexec_exec"), NUMBER)),
        "env": STRING_TABLE,
        "qemu": QEMU,
        "description": STRING,
        "vars": STRING_TABLE,
        "kvm_params": STRING_TABLE,
        "kind": STRING,
        "lava": lava.LAVA,
    }
)
KINDS = ("ssh", "lava")
SETTINGS = Keys(
    {"default": STRING, "dmesg_ignore": STRINGS, "trace": STRING_TABLE, "keep_warm": BOOLEAN}
)


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
    # Under TCG: one host thread per vCPU (QEMU's default) or one for all. The nested pair box
    # needs "single": multi-threaded TCG loses nested-SVM state under memslot churn (README).
    tcg_thread: str = "multi"

    @property
    def series(self) -> str:
        """The series whose QEMU this box runs (binary = "series:NAME"), or ""."""
        if self.binary.startswith(SERIES_BINARY):
            return self.binary.removeprefix(SERIES_BINARY)
        return ""


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
    console_log: Path | None = None  # a file on this machine its serial console is logged to
    cmdline: str = ""  # the new kernel's command line; empty: kexec --reuse-cmdline
    initrd: Path | None = None  # passed with the kernel (kexec, grub); the QEMU box has its own
    workdir: str = "/tmp/kseries"  # where uploads go on the box
    timeouts: Timeouts = field(default_factory=Timeouts)
    env: dict[str, str] = field(default_factory=dict)  # exported to every test on this box
    vars: dict[str, str] = field(default_factory=dict)  # fills {NAME}s in the tests' args
    qemu: QemuSettings | None = None
    description: str = ""
    # KVM module parameters for the box's kernel command line ("kvm.tdp_mmu" = "0"): which
    # MMU the guest's KVM runs is a fact of the box. KVM is built in (kvm-testbox.config), so
    # they apply at boot; the run reads back what the box really shows (kseries/testbox/mmu.py).
    kvm_params: dict[str, str] = field(default_factory=dict)
    lava: lava.LavaSettings | None = None  # kind "lava": a LAVA lab runs the kernel, not SSH

    @property
    def kvm_claims(self) -> dict[str, str]:
        """Every KVM module parameter this box says its kernel boots with: those in kvm_params
        and any MODULE.PARAM=VALUE of a KVM module written into cmdline itself."""
        found = {}
        for word in self.cmdline.split():
            name, _, value = word.partition("=")
            if name.partition(".")[0] in KVM_MODULES and "." in name:
                found[name] = value
        return found | self.kvm_params

    def with_kvm_params(self, cmdline: str) -> str:
        """`cmdline` with kvm_params appended, except those it already sets."""
        present = {word.partition("=")[0] for word in cmdline.split()}
        extra = [f"{k}={v}" for k, v in self.kvm_params.items() if k not in present]
        return " ".join([cmdline, *extra]).strip()

    @property
    def is_local_qemu(self) -> bool:
        return self.qemu is not None

    @property
    def state_dir(self) -> Path:
        """Where a local QEMU box keeps its console log, keys and state."""
        if self.qemu and self.qemu.state_dir:
            return self.qemu.state_dir
        return testbox_dir(self.name)

    def address(self, port: int | None = None) -> str:
        """user@host:port, for messages (never anything secret)."""
        return f"{self.user}@{self.host}:{port or self.port}"


def _path(value: Any, directory: Path) -> Path | None:
    if value in (None, ""):
        return None
    return (directory / Path(str(value)).expanduser()).resolve()


def parse_box(name: str, table: dict[str, Any], directory: Path, where: Where | str) -> Box:
    """One [box.NAME] table; relative paths are taken from the configs directory. `where`
    names the table in errors (a bare label for a table that is not from a file)."""
    where = Where(where) if isinstance(where, str) else where
    where.check(BOX, table)
    kind = table.get("kind", "lava" if "lava" in table else "ssh")
    if kind not in KINDS:
        raise where.error(
            "kind", f"kind {kind!r} is not one of {', '.join(KINDS)}", 'kind = "lava"'
        )
    if kind == "lava":
        return _lava_box(name, table, directory, where)
    qemu_table = table.get("qemu")
    method = table.get("method", "qemu" if qemu_table is not None else "")
    if method not in METHODS:
        raise where.error(
            "method",
            f"method {method!r} is not one of {', '.join(METHODS)}",
            'set method = "kexec", "grub-reboot" or "qemu" (qemu needs a [qemu] table)',
        )
    if method == "qemu" and qemu_table is None:
        raise where.error("method", 'method "qemu" needs a qemu table', "add qemu = {}")
    qemu = None
    if qemu_table is not None:
        qemu = QemuSettings(
            cpu=qemu_table.get("cpu", "max"),
            memory=qemu_table.get("memory", "1G"),
            smp=qemu_table.get("smp", 1),
            accel=qemu_table.get("accel", "auto"),
            extra_args=tuple(qemu_table.get("extra_args", ())),
            state_dir=_path(qemu_table.get("state_dir"), directory),
            binary=qemu_table.get("binary", "qemu-system-x86_64"),
            tsc_khz=qemu_table.get("tsc_khz", -1),
            tcg_thread=qemu_table.get("tcg_thread", "multi"),
        )
        for key, words in QEMU_CHOICES.items():
            if getattr(qemu, key) not in words:
                allowed = f"{', '.join(words[:-1])} or {words[-1]}"
                raise where.table("qemu").error(key, f"{key} must be {allowed}", "see the file")
        _check_series_binary(qemu, directory, where.table("qemu"))
    timeouts = Timeouts(**{k: float(v) for k, v in table.get("timeouts", {}).items()})
    _check_kvm_params(table, method, where)
    if qemu is None:
        missing = [k for k in ("host", "identity", "known_hosts") if not table.get(k)]
        if missing:
            raise where.error(
                None,
                f"a remote box needs {', '.join(missing)}",
                "see the commented example in configs/testboxes.toml",
            )
    return Box(
        name=name,
        method=method,
        host=table.get("host", "127.0.0.1"),
        port=table.get("port", 0 if qemu else 22),
        user=table.get("user", "root"),
        identity=_path(table.get("identity"), directory),
        known_hosts=_path(table.get("known_hosts"), directory),
        power_cycle=table.get("power_cycle", ""),
        console_log=_path(table.get("console_log"), directory),
        cmdline=table.get("cmdline", ""),
        initrd=_path(table.get("initrd"), directory),
        workdir=table.get("workdir", "/tmp/kseries"),
        timeouts=timeouts,
        env=dict(table.get("env", {})),
        vars=dict(table.get("vars", {})),
        qemu=qemu,
        description=table.get("description", ""),
        kvm_params=dict(table.get("kvm_params", {})),
    )


def _check_series_binary(qemu: QemuSettings, directory: Path, where: Where) -> None:
    if not qemu.binary.startswith(SERIES_BINARY):
        return
    name = qemu.series
    if not name or "/" in name or not (directory / name / "series.toml").is_file():
        series = sorted(p.parent.name for p in directory.glob("*/series.toml"))
        raise where.error(
            "binary",
            f"binary {qemu.binary!r}: no series {name!r} (no {directory / name / 'series.toml'})",
            f"series that build a QEMU here: {', '.join(series) or 'none'}",
        )


def _check_kvm_params(table: dict[str, Any], method: str, where: Where) -> None:
    """kvm_params names parameters of KVM's modules, each set once, on a box whose boot
    method passes a command line (grub-reboot boots the box's own)."""
    params = table.get("kvm_params", {})
    inner = where.table("kvm_params")
    set_in_cmdline = {w.partition("=")[0] for w in table.get("cmdline", "").split()}
    for name, value in params.items():
        module, dot, param = name.partition(".")
        if module not in KVM_MODULES or not dot or not param.isidentifier():
            raise inner.error(
                name,
                f"{name!r} is not MODULE.PARAM of {', '.join(KVM_MODULES)}",
                'write it as "kvm.tdp_mmu" = "0" or "kvm_amd.npt" = "0"',
            )
        if not value or any(c.isspace() for c in value):
            raise inner.error(
                name, f"{name} must be one word, not {value!r}", f'write it as "{name}" = "0"'
            )
        if name in set_in_cmdline:
            raise inner.error(
                name,
                f"{name} is set in both cmdline and kvm_params",
                "keep it in kvm_params only",
            )
    if params and method == "grub-reboot":
        raise where.error(
            "kvm_params",
            "kvm_params needs a boot method that passes a command line (kexec or qemu); "
            "grub-reboot boots the box's own",
            'put them in the box\'s GRUB_CMDLINE_LINUX, or use method = "kexec"',
        )


def _lava_box(name: str, table: dict[str, Any], directory: Path, where: Where) -> Box:
    """A [box.NAME] of kind lava: the lab boots the kernel; SSH and QEMU keys make no sense."""
    foreign = [k for k in table if k not in LAVA_BOX_KEYS]
    if foreign:
        raise where.error(
            foreign[0],
            f"{foreign[0]} is not a setting of a lava box",
            f"a lava box has {', '.join(LAVA_BOX_KEYS)}",
        )
    if "lava" not in table:
        raise where.error("lava", "a lava box needs a lava table", 'add lava = { url = "..." }')
    timeouts = Timeouts(**{k: float(v) for k, v in table.get("timeouts", {}).items()})
    return Box(
        name=name,
        method="lava",
        cmdline=table.get("cmdline", ""),
        timeouts=timeouts,
        env=dict(table.get("env", {})),
        vars=dict(table.get("vars", {})),
        description=table.get("description", ""),
        lava=lava.parse(table["lava"], directory, where.table("lava")),
    )


LAVA_BOX_KEYS = ("kind", "description", "cmdline", "timeouts", "env", "vars", "lava")


@dataclass(frozen=True)
class TestboxConfig:
    """Everything configs/testboxes.toml says: boxes, tests, recipes and defaults."""

    __test__ = False  # not a pytest class, despite the name

    files: Config  # testboxes.toml with local.toml's test-box tables merged over it

    @classmethod
    def load(cls, config: Config) -> TestboxConfig:
        """configs/testboxes.toml, with any [testbox], [box.*], [[test]] or [recipe.*] that
        configs/local.toml has merged over it."""
        path = config.configs / FILE
        sources = [Source.read(path, SECTIONS)] if path.is_file() else []
        local = config.source(LOCAL)
        if config.home is not None:  # another series: the boxes of configs/local.toml
            mine_path = config.home / LOCAL
            local = Source.read(mine_path, ALL_TABLES) if mine_path.is_file() else None
        if local is not None:
            mine = {k: v for k, v in local.data.items() if k in SECTIONS}
            sources.append(Source(local.path, mine, local.tables))
        return cls(Config.of(config.configs, sources))

    @property
    def directory(self) -> Path:
        return self.files.directory

    def settings(self) -> dict[str, Any]:
        return self.files.table("testbox", SETTINGS)

    def box(self, name: str = "") -> Box:
        boxes = self.files.table("box", BOXES)
        name = name or os.environ.get("KSERIES_BOX") or self.settings().get("default", "local")
        if name not in boxes:
            raise ToolkitError(
                f"no test box {name!r} in {self.directory / FILE}",
                f"boxes: {', '.join(sorted(boxes)) or 'none'}; add [box.{name}] there or "
                "in configs/local.toml",
            )
        where = self.files.where.table("box").table(name)
        return parse_box(name, boxes[name], self.directory, where)

    def names(self) -> list[str]:
        return sorted(self.files.table("box", BOXES))


SECTIONS = TABLES[FILE]
BOXES = Names(BOX)
