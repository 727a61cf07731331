"""Which of KVM's three x86 MMUs a box's kernel really runs, read from the box after the boot.

The series touches code that only one MMU runs (`direct_map()`: the legacy TDP MMU;
`FNAME(fetch)`: shadow paging), so a verdict is worth only as much as the MMU it ran under,
and the config cannot vouch for that: a parameter can be misspelt, ignored by a kernel whose
KVM is a module, or overridden by a CPU without NPT/EPT. KVM settles it at vendor-module init
and shows the outcome in sysfs:

- TDP off (`kvm_amd.npt` or `kvm_intel.ept` reads N): the shadow MMU;
- TDP on and `kvm.tdp_mmu` N: the legacy TDP MMU;
- TDP on and `kvm.tdp_mmu` Y: the TDP MMU.

Both vendor modules may be built in, and a built-in module's parameters are in sysfs even
when it never initialised (kvm_intel's `ept` reads Y on an AMD CPU), so the CPU's svm or vmx
flag decides which vendor parameter counts. The TDP test comes first because kernels before
6.3's rework showed the user's `tdp_mmu` wish, not the outcome.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kseries.errors import ToolkitError
from kseries.testbox.ssh import Remote

TDP_MMU, LEGACY, SHADOW, UNKNOWN = "TDP MMU", "legacy TDP MMU", "shadow MMU", "unknown"
READ = ("kvm.tdp_mmu", "kvm_amd.npt", "kvm_intel.ept")
VENDOR_PARAM = {"svm": "kvm_amd.npt", "vmx": "kvm_intel.ept"}  # the CPU flag's TDP switch
SYSFS = "/sys/module"


@dataclass(frozen=True)
class Kvm:
    """What the box's KVM showed: the MMU, the readings it follows from, the CPU model, and
    every parameter the box claims to boot with that the box does not show."""

    mmu: str
    tdp_mmu: bool | None
    npt: bool | None  # None unless the AMD vendor module is the one that runs
    cpu: str
    params: dict[str, str]
    mismatches: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The report's "kvm" key, in the shape the helpers agreed on."""
        return {
            "mmu": self.mmu,
            "tdp_mmu": self.tdp_mmu,
            "npt": self.npt,
            "cpu": self.cpu,
            "params": self.params,
        }


def _bool(value: str | None) -> bool | None:
    """A parameter as the kernel's kstrtobool() reads it (None: not a boolean)."""
    if not value:
        return None
    if value[0] in "yYtT1" or value.lower() == "on":
        return True
    if value[0] in "nNfF0" or value.lower() == "off":
        return False
    return None


def command(claims: Mapping[str, str]) -> str:
    """The one shell command that reads it all: `param NAME VALUE` per readable parameter,
    then the CPU's model name and flags, and whether /dev/kvm exists."""
    names = list(dict.fromkeys([*READ, *claims]))
    files = " ".join(shlex.quote(f"{SYSFS}/{_path(name)}") for name in names)
    return (
        f'for f in {files}; do [ -r "$f" ] && echo "param $f $(cat "$f")"; done; '
        "grep -m1 '^model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; "
        "[ -c /dev/kvm ] && echo 'dev_kvm yes'; true"
    )


def _path(name: str) -> str:
    module, _, param = name.partition(".")
    return f"{module}/parameters/{param}"


def parse(text: str, claims: Mapping[str, str]) -> Kvm:
    """The Kvm that `command`'s output shows, checked against what the box claims."""
    params: dict[str, str] = {}
    cpu, flags, dev_kvm = "", set[str](), False
    for line in text.splitlines():
        if line.startswith(f"param {SYSFS}/"):
            path, _, value = line[len(f"param {SYSFS}/") :].partition(" ")
            module, _, param = path.partition("/parameters/")
            params[f"{module}.{param}"] = value.strip()
        elif line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
        elif line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
        elif line.strip() == "dev_kvm yes":
            dev_kvm = True
    vendor = next((VENDOR_PARAM[f] for f in ("svm", "vmx") if f in flags), None)
    tdp = _bool(params.get(vendor)) if vendor else None
    tdp_mmu = _bool(params.get("kvm.tdp_mmu"))
    if not dev_kvm or tdp is None:
        mmu = UNKNOWN
    elif not tdp:
        mmu = SHADOW
    else:
        mmu = TDP_MMU if tdp_mmu else LEGACY
    npt = tdp if vendor == "kvm_amd.npt" else None
    return Kvm(mmu, tdp_mmu, npt, cpu, params, _mismatches(claims, params))


def _mismatches(claims: Mapping[str, str], shown: Mapping[str, str]) -> tuple[str, ...]:
    found = []
    for name, claimed in claims.items():
        value = shown.get(name)
        if value is None:
            found.append(f"claims {name}={claimed}, but the box has no {SYSFS}/{_path(name)}")
        elif value != claimed and (_bool(value) is None or _bool(value) != _bool(claimed)):
            found.append(f"claims {name}={claimed}, but the box shows {name}={value}")
    return tuple(found)


def read(remote: Remote, claims: Mapping[str, str], timeout: float = 30) -> Kvm:
    """Read the MMU from the box; a box that cannot say is "unknown", never a guess."""
    try:
        result = remote.run(command(claims), timeout=timeout, check=True)
    except ToolkitError as e:
        unread = tuple(
            f"claims {k}={v}, but reading the box failed: {e}" for k, v in claims.items()
        )
        return Kvm(UNKNOWN, None, None, "", {}, unread)
    return parse(result.stdout, claims)
