"""`invoke test-remote --trace`: which fault-path functions ran during the tests, and what they
returned, from kprobe events through tracefs. This needs no bpftrace on the box, so the
initramfs box is traceable as well as a real one (its kernel needs CONFIG_KPROBE_EVENTS, and
CONFIG_HIST_TRIGGERS for the return values: configs/fault-trace.config).

For each function in `[testbox] trace` the box gets an entry probe (its hit count, from
kprobe_profile) and, unless the function returns void, a return probe with a `hist:keys=ret`
trigger, so the kernel itself counts the return values: no event stream crosses SSH. A
function that is not in /proc/kallsyms (inlined, or not built) is reported as such; a gcc clone
(`name.isra.0`) is probed instead of the missing original. A box without tracefs or kprobe
events gets the reason in the report, and its tests run untraced.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kseries.errors import ToolkitError
from kseries.testbox.ssh import Remote

SCRIPT = Path(__file__).with_name("fault-trace.sh")
HIST = re.compile(r"\{ ret:\s*(-?\d+) \} hitcount:\s*(\d+)")
FETCH = {"int": "s32", "long": "s64", "void": "void"}  # C return type -> kprobe fetch type


@dataclass
class Trace:
    """What one run's probes saw: per function, calls and return values (value -> count)."""

    available: bool
    reason: str = ""
    calls: dict[str, int] = field(default_factory=dict)
    returns: dict[str, dict[int, int]] = field(default_factory=dict)
    probed: dict[str, str] = field(default_factory=dict)  # function -> the symbol probed
    absent: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "method": "kprobe events (tracefs)",
            "functions": {
                f: {
                    "symbol": symbol,
                    "calls": self.calls.get(f, 0),
                    "returns": {str(v): n for v, n in sorted(self.returns.get(f, {}).items())},
                }
                for f, symbol in self.probed.items()
            },
            "absent": self.absent,
        }

    def lines(self) -> list[str]:
        if not self.available:
            return [f"trace: not available on this box: {self.reason}"]
        out = []
        for function, symbol in self.probed.items():
            returned = ", ".join(
                f"{value} x{count}"
                for value, count in sorted(self.returns.get(function, {}).items())
            )
            name = function if symbol == function else f"{function} (as {symbol})"
            out.append(
                f"trace: {name}: {self.calls.get(function, 0)} calls"
                + (f"; returned {returned}" if returned else "")
            )
        out += [
            f"trace: {f}: no such symbol on the box (inlined?), not probed" for f in self.absent
        ]
        return out


def _event(symbol: str) -> str:
    return re.sub(r"\W", "_", symbol)


class FaultTrace:
    """Entry and return probes on `functions`, attached for the tests of one run."""

    def __init__(self, functions: Mapping[str, str]) -> None:
        """`functions`: name -> C return type (int, long or void)."""
        unknown = {f: t for f, t in functions.items() if t not in FETCH}
        if unknown:
            raise ToolkitError(
                f"[testbox] trace: return type {', '.join(map(repr, unknown.values()))} of "
                f"{', '.join(unknown)} is not one of {', '.join(FETCH)}",
                'write e.g. trace = { kvm_mmu_faultin_pfn = "int" }',
            )
        self.functions = dict(functions)

    def attach(self, remote: Remote) -> Trace:
        """Set the probes up; the Trace says what was probed, or why the box cannot be traced."""
        trace = Trace(available=True)
        probes = [f"{f}:{FETCH[t]}" for f, t in self.functions.items()]
        for line in self._script(remote, "attach", *probes).splitlines():
            word, _, rest = line.partition(" ")
            if word == "unavailable":
                return Trace(available=False, reason=rest)
            if word == "absent":
                trace.absent.append(rest)
            elif word == "probed":
                function, _, symbol = rest.partition(" ")
                trace.probed[function] = symbol
        return trace

    def collect(self, remote: Remote, trace: Trace) -> Trace:
        """Read the counts into `trace`, then take the probes down."""
        if not trace.available:
            return trace
        pairs = [f"{f}={s}" for f, s in trace.probed.items()]
        entry_hits = {}
        current = ""
        for line in self._script(remote, "collect", *pairs).splitlines():
            fields = line.split()
            if line.startswith("== "):
                current = line[3:]
                trace.returns[current] = {}
            elif current and (m := HIST.search(line)):
                value = int(m.group(1))  # the kernel prints it as an unsigned 64-bit number
                trace.returns[current][value - (1 << 64) if value >> 63 else value] = int(
                    m.group(2)
                )
            elif len(fields) == 3 and fields[0].endswith("_entry") and fields[1].isdigit():
                entry_hits[fields[0].removesuffix("_entry")] = int(fields[1])
        for function, symbol in trace.probed.items():
            trace.calls[function] = entry_hits.get(_event(symbol), 0)
        return trace

    @staticmethod
    def _script(remote: Remote, *args: str) -> str:
        command = "sh -s -- " + shlex.join(args)
        return remote.run(command, stdin=SCRIPT.read_bytes(), timeout=60).stdout
