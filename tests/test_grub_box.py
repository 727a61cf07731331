"""The grub-reboot method on a real Debian box: bookworm with GRUB, systemd, udev and sshd on a
disk image (kseries/testbox/distro.py), booted by QEMU under TCG from its disk, and driven by
`test-remote` as any lab machine: SSH on 127.0.0.1 with a pinned host key, its serial console
in a file, its power button a reset through the QEMU monitor (the box's power_cycle command).

What it proves, in order (each phase's time is printed and kept in the test's out/times.json):
1. the box boots its Debian kernel to SSH;
2. with Debian's stock GRUB_DEFAULT=0 the method refuses, with the fix, and installs nothing;
3. grub-reboot boots the series kernel (built with configs/distro-box.config) once, proven by
   /proc/version against its manifest, and the kernel and its entry are removed afterwards;
4. the next plain reboot is back on the Debian kernel;
5. a kernel that panics (the plain test-box kernel: no block layer, so no root) is "boot failed"
   with the panic on the console, and the power cycle brings the box back on Debian's kernel.

Nothing is mocked. It takes 8 to 12 minutes under TCG (and a kernel build and about 3 minutes of
image build when cold), so it runs only with KSERIES_GRUB_TEST=1; it needs root (the image).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kseries import build as build_stage
from kseries.config import Config
from kseries.paths import PROJECT, cache_dir
from kseries.testbox import boot, distro, kernel, session
from kseries.testbox.box import TestboxConfig
from kseries.testbox.machine import Machine
from kseries.tree import prepare_default_tree

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("KSERIES_GRUB_TEST"),
        reason="opt-in (8-12 min under TCG): set KSERIES_GRUB_TEST=1",
    ),
]

FRAGMENTS = ["kvm-testbox", "vfio-edu", "fault-trace", "distro-box"]
TESTBOXES = """
[testbox]
default = "debian"

[box.debian]
method = "grub-reboot"
host = "127.0.0.1"
port = {port}
identity = "{identity}"
known_hosts = "{known_hosts}"
power_cycle = "{power_cycle}"
console_log = "{console_log}"
timeouts = {{ connect = 10, boot = 900, test = 120 }}

[[test]]
name = "root-disk"
description = "the series kernel runs Debian's userspace from the disk"
command = "cat /proc/version && findmnt -n -o SOURCE / && systemctl is-active ssh"
timeout = 60
"""


class Times:
    """Each phase's wall time, printed as it ends and written to out/times.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.phases: dict[str, float] = {}
        self.started = time.monotonic()

    def __call__(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = round(now - self.started, 1)
        self.started = now
        print(f"grub-box: {phase}: {self.phases[phase]:.1f}s", flush=True)
        self.path.write_text(json.dumps(self.phases, indent=2) + "\n")


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[distro.DiskBox, Times]]:
    root = tmp_path_factory.mktemp("grub-box")
    times = Times(root / "times.json")
    made = distro.build_image(log=print)
    times("image (build or cached)")
    box = distro.DiskBox(made, root / "box")
    box.start()
    try:
        yield box, times
    finally:
        box.stop()


def _config(box: distro.DiskBox, directory: Path) -> Config:
    directory.mkdir(exist_ok=True)
    (directory / "series.toml").write_text((PROJECT / "configs" / "series.toml").read_text())
    table = box.box_table()
    (directory / "testboxes.toml").write_text(
        TESTBOXES.format(
            port=table["port"],
            identity=table["identity"],
            known_hosts=table["known_hosts"],
            power_cycle=str(table["power_cycle"]).replace('"', '\\"'),
            console_log=table["console_log"],
        )
    )
    return Config.load(directory)


def _series_kernel() -> kernel.Kernel:
    """The default tree's checked-out branch with the distro-box fragment, in a build directory
    of its own (so the shared default build and its last.json are left alone)."""
    tree = prepare_default_tree(log=lambda _: None).path
    manifest = build_stage.build(
        Config.load(PROJECT / "configs"),
        tree=str(tree),
        out=str(cache_dir() / "build" / "distro-box"),
        fragments=FRAGMENTS,
        set_last=False,
        log=print,
    )
    return kernel.load(str(manifest.path))


def _panicking_kernel() -> kernel.Kernel:
    """The plain test-box kernel (tests/test_testbox_qemu.py's A): no block layer, so on a disk
    box it panics for want of a root file system."""
    from tests.test_testbox_qemu import build_test_kernels

    return kernel.load(str(build_test_kernels().a.parent / "manifest.json"))


def _on_box(config: Config, command: str) -> str:
    machine = Machine(TestboxConfig.load(config).box("debian"))
    try:
        machine.wait_for_ssh(30)
        return machine.remote().run(command, timeout=120, check=True).stdout
    finally:
        machine.disconnect()


def test_grub_reboot_on_a_debian_box(
    debian: tuple[distro.DiskBox, Times], tmp_path: Path
) -> None:
    box, times = debian
    series, panics = _series_kernel(), _panicking_kernel()
    times("kernels (built or cached)")
    config = _config(box, tmp_path / "configs")
    settings = TestboxConfig.load(config)
    machine = Machine(settings.box("debian"), log=print)

    # 1. Debian's own kernel, to SSH
    machine.wait_for_ssh(900, what="SSH on the Debian kernel")
    distro_kernel = boot.identify(machine.remote())
    machine.disconnect()
    assert "Debian" in distro_kernel.proc_version and not series.matches(
        distro_kernel.proc_version
    )
    times("boot to SSH (Debian kernel)")

    # 2. stock GRUB_DEFAULT=0: refused with the fix, nothing installed
    _on_box(config, "sed -i 's/^GRUB_DEFAULT=.*/GRUB_DEFAULT=0/' /etc/default/grub")
    runs, _ = session.test_remote(
        config, kernel_spec=str(series.path), out=str(tmp_path / "refused"), log=print
    )
    (refused,) = runs
    assert refused.verdict == "error"
    assert "GRUB_DEFAULT=0" in refused.reason and "grub-set-default" in refused.reason
    assert "GRUB_DEFAULT=saved" in refused.reason
    assert _on_box(config, "ls /boot/kseries /etc/grub.d/45_kseries 2>&1 || true").count(
        "No such file"
    ) == 2
    _on_box(config, "sed -i 's/^GRUB_DEFAULT=.*/GRUB_DEFAULT=saved/' /etc/default/grub")
    times("GRUB_DEFAULT=0 refused")

    # 3. one-shot boot of the series kernel, proven; its kernel and entry removed afterwards
    runs, out = session.test_remote(
        config, kernel_spec=str(series.path), out=str(tmp_path / "series"), log=print
    )
    (one_shot,) = runs
    assert one_shot.verdict == "pass", one_shot.reason
    assert series.matches(one_shot.after["proc_version"])
    assert one_shot.before["boot_id"] != one_shot.after["boot_id"]
    assert "/dev/vda1" in one_shot.tests[0].stdout
    assert {"upload", "update_grub", "boot", "cleanup"} <= set(one_shot.timings)
    console = (out / "debian" / "kernel" / "console.log").read_text()
    assert "kseries test kernel" in console or series.utsversion in console
    left = _on_box(config, "ls /boot/kseries 2>&1; grep -c kseries /boot/grub/grub.cfg || true")
    assert "No such file" in left and left.strip().endswith("0")
    times(
        f"one-shot boot of the series kernel (upload {one_shot.timings['upload']:.0f}s, "
        f"update-grub {one_shot.timings['update_grub']:.0f}s, to SSH "
        f"{one_shot.timings['to_ssh']:.0f}s, cleanup {one_shot.timings['cleanup']:.0f}s)"
    )

    # 4. a plain reboot: back on Debian's kernel
    machine.wait_for_ssh(30)
    machine.remote().start("reboot", wait=3)
    machine.disconnect()
    time.sleep(5)
    machine.wait_for_ssh(900, what="SSH after a plain reboot")
    after_reboot = boot.identify(machine.remote())
    machine.disconnect()
    assert after_reboot.proc_version == distro_kernel.proc_version
    assert after_reboot.boot_id not in (distro_kernel.boot_id, one_shot.after["boot_id"])
    times("plain reboot back to the Debian kernel")

    # 5. a panicking kernel: boot failed, console lines, power cycle, back on Debian's kernel
    runs, _ = session.test_remote(
        config, kernel_spec=str(panics.path), out=str(tmp_path / "panic"), log=print
    )
    (panicked,) = runs
    assert panicked.verdict == "boot failed", panicked.reason
    assert "panicked" in panicked.reason
    assert any("Kernel panic" in line for line in panicked.console_tail)
    assert "socat" in panicked.recovery and "answers again" in panicked.recovery
    back = boot.identify(machine.remote())
    machine.disconnect()
    assert back.proc_version == distro_kernel.proc_version
    assert "No such file" in _on_box(config, "ls /boot/kseries 2>&1 || true")
    times(f"panic, power cycle and fallback (recovery: {panicked.recovery})")
