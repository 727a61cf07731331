"""The base config (tinyconfig, defconfig or a .config file) and the configs/ fragments,
merged with the tree's own `scripts/kconfig/merge_config.sh` and `make olddefconfig`, then
checked: every option a fragment asked for must have survived, or the error names the option
and the Kconfig dependency that dropped it."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kseries.build.failure import _missing_tool
from kseries.build.kconfig import KconfigIndex
from kseries.build.manifest import STATE_VERSION, sha256_file
from kseries.build.toolchain import _env
from kseries.core import run as door
from kseries.errors import ToolkitError

Log = Callable[[str], None]

BASES = ("tinyconfig", "defconfig")


@dataclass(frozen=True)
class Fragment:
    """A config fragment: the options it asks for, and the line of each (for messages)."""

    name: str
    path: Path
    options: dict[str, str]  # "CONFIG_KVM" -> "y", "m", '"text"', "123", or "n" (is not set)
    lines: dict[str, int]

    @classmethod
    def load(cls, ref: str, directory: Path) -> Fragment:
        """`ref` is a name in `directory` (kvm-testbox or kvm-testbox.config) or a file path."""
        path = _fragment_path(ref, directory)
        options: dict[str, str] = {}
        lines: dict[str, int] = {}
        for number, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
            line = raw.strip()
            unset = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
            setting = re.fullmatch(r"(CONFIG_\w+)=(.*)", line)
            if unset:
                options[unset.group(1)], lines[unset.group(1)] = "n", number
            elif setting:
                options[setting.group(1)], lines[setting.group(1)] = setting.group(2), number
            elif line and not line.startswith("#"):
                raise ToolkitError(
                    f"{path}:{number}: not a config line: {line!r}",
                    "write CONFIG_NAME=value or `# CONFIG_NAME is not set`",
                )
        name = path.name.removesuffix(".config") if path.parent == directory else str(path)
        return cls(name, path, options, lines)

    def where(self, option: str) -> str:
        return f"{self.path}:{self.lines[option]}"


def _fragment_path(ref: str, directory: Path) -> Path:
    if "/" in ref:
        path = Path(ref).expanduser().resolve()
        if path.is_file():
            return path
        raise ToolkitError(f"config fragment {ref}: no such file", "pass an existing file")
    path = directory / (ref if ref.endswith(".config") else f"{ref}.config")
    if path.is_file():
        return path
    known = sorted(p.stem for p in directory.glob("*.config"))
    raise ToolkitError(
        f"config fragment {ref!r}: no {path}",
        f"fragments in {directory}: {', '.join(known) or 'none'}",
    )


def read_config(path: Path) -> dict[str, str]:
    """A .config as {"CONFIG_X": value}; unset options are absent."""
    values = {}
    for line in path.read_text(errors="replace").splitlines():
        match = re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip())
        if match:
            values[match.group(1)] = match.group(2)
    return values


class BuildConfig:
    """The base config plus the fragments: written to BUILD/.config, then checked."""

    def __init__(self, base: str, fragments: Sequence[Fragment], arch: str = "") -> None:
        self.base = base
        self.fragments = tuple(fragments)
        self.arch = arch  # make's ARCH; empty: the host's

    @classmethod
    def resolve(
        cls, base: str, refs: Sequence[str], directory: Path, arch: str = ""
    ) -> BuildConfig:
        """Check the base and load the fragments, before any tree or make is touched."""
        if base not in BASES:
            path = Path(base).expanduser()
            if not path.is_file():
                raise ToolkitError(
                    f"base config {base!r} is neither {' nor '.join(BASES)} nor a file",
                    "pass --base-config tinyconfig, defconfig or the path of a .config",
                )
            try:
                text = path.read_text(errors="replace")
            except OSError as e:
                raise ToolkitError(f"base config {path}: {e.strerror}", "check the file") from e
            if not re.search(r"^(CONFIG_\w+=|# CONFIG_\w+ is not set)", text, re.MULTILINE):
                raise ToolkitError(
                    f"base config {path} has no CONFIG_ lines: it is not a kernel .config",
                    "pass a .config written by the kernel's make *config",
                )
            base = str(path.resolve())
        return cls(base, [Fragment.load(ref, directory) for ref in refs], arch)

    def requested(self) -> dict[str, tuple[str, Fragment]]:
        """Every option the fragments ask for, with the fragment that has the last word."""
        wanted: dict[str, tuple[str, Fragment]] = {}
        for fragment in self.fragments:
            for option, value in fragment.options.items():
                wanted[option] = (value, fragment)
        return wanted

    def digest(self) -> str:
        """Changes whenever the inputs do: base (name or content) and each fragment's text."""
        arch = f"ARCH={self.arch}\0" if self.arch else ""
        h = hashlib.sha256(f"v{STATE_VERSION}\0{self.base}\0{arch}".encode())
        if self.base not in BASES:
            h.update(Path(self.base).read_bytes())
        for fragment in self.fragments:
            h.update(f"\0{fragment.path}\0".encode() + fragment.path.read_bytes())
        return h.hexdigest()

    def prepare(
        self,
        tree: Path,
        build_dir: Path,
        make_vars: Sequence[str],
        output: IO[str],
        state: dict[str, Any],
        log: Log,
    ) -> bool:
        """Write BUILD/.config unless it already is what these inputs give; True if written.

        Skipping matters: rewriting .config costs seconds and makes kbuild re-sync its config.
        """
        dot_config = build_dir / ".config"
        stamp = state.get("config", {})
        if (
            stamp.get("inputs") == self.digest()
            and dot_config.is_file()
            and stamp.get("sha256") == sha256_file(dot_config)
        ):
            self.verify(tree, dot_config)
            return False
        names = ", ".join(f.name for f in self.fragments) or "no fragments"
        log(f"build: configuring {Path(self.base).name} + {names}")

        def kconfig(*args: str) -> None:
            _run_kconfig([*args], tree, output)

        make = ["make", "-C", str(tree), f"O={build_dir}", *make_vars]
        if self.base in BASES:
            kconfig(*make, self.base)
        else:
            shutil.copyfile(self.base, dot_config)
        if self.fragments:
            kconfig(
                str(tree / "scripts/kconfig/merge_config.sh"),
                "-m",
                "-O",
                str(build_dir),
                str(dot_config),
                *(str(f.path) for f in self.fragments),
            )
        kconfig(*make, "olddefconfig")
        self.verify(tree, dot_config)
        state["config"] = {"inputs": self.digest(), "sha256": sha256_file(dot_config)}
        return True

    def verify(self, tree: Path, dot_config: Path) -> None:
        """Fail, naming the option and its unmet dependency, if Kconfig dropped a request."""
        final = read_config(dot_config)
        dropped = {}
        for option, (value, fragment) in self.requested().items():
            got = final.get(option, "n")
            if got != value and not (value == "n" and option not in final):
                dropped[option] = (value, got, fragment)
        if not dropped:
            return
        index = KconfigIndex(tree)
        reasons = {opt: index.why(opt[7:], want, final) for opt, (want, _, _) in dropped.items()}
        # Name a root cause: an option whose unmet dependencies are not themselves dropped.
        names = {opt[7:] for opt in dropped}
        option = next((o for o in dropped if not reasons[o].symbols & names), next(iter(dropped)))
        want, got, fragment = dropped[option]
        reason = reasons[option]
        shown = "not set" if got == "n" else got
        others = [o for o in dropped if o != option]
        hint = reason.hint
        if others:
            hint += f"; also dropped: {', '.join(others)}"
        asked, did = f"{option}={want}", "dropped it"
        if want == "n":
            asked, did = f"`# {option} is not set`", "kept it on"
        raise ToolkitError(
            f"{fragment.where(option)} asks for {asked}, but Kconfig {did} "
            f"(final .config: {shown}): {reason.text}",
            hint,
        )


def _run_kconfig(cmd: Sequence[str], tree: Path, output: IO[str]) -> None:
    output.write(f"$ {' '.join(cmd)}\n")
    output.flush()
    done = door.run(cmd, cwd=tree, env=_env(), stderr=door.STDOUT, check=False)
    output.write(done.stdout)
    output.flush()
    if done.ok:
        return
    lines = done.stdout.splitlines()
    missing = _missing_tool(lines)
    if missing:
        raise missing
    # Kconfig names its own errors "FILE:LINE: what"; else make's or the script's complaint.
    first = next((line for line in lines if re.match(r"[\w./-]+:\d+: ", line)), None)
    first = first or next((line for line in lines if re.search(r"\berror\b", line, re.I)), None)
    first = first or (lines[-1] if lines else f"exit {done.status}")
    first = first.replace(f"{tree}/", "")
    step = Path(cmd[0]).name if cmd[0] != "make" else f"make {cmd[-1]}"
    raise ToolkitError(
        f"Kconfig failed in {step} (exit {done.status}): {first.strip()}",
        f"the whole output is in {output.name}; a Kconfig syntax error names its file:line",
    )
