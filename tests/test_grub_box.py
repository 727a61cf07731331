"""The grub-reboot method on a real Debian box: bookworm with GRUB, systemd, udev and sshd on a
disk image (kseries/testbox/distro.py), booted by QEMU under TCG from its disk, and driven by
`test-remote` as any lab machine: SSH on 127.0.0.1 with a pinned host key, its serial console
in a file, its power button a reset through the QEMU monitor (the box's power_cycle command).

What it proves, in order (each phase's time is printed and kept in the test's times.json):
1. the box boots its Debian kernel to SSH;
2. with Debian's stock GRUB_DEFAULT=0 the method refuses, with the fix, and installs nothing;
3. grub-reboot boots the series kernel once (the test-box build B of tests/test_testbox_qemu.py,
   with the image's initramfs as the box's initrd: the toolkit's busybox/dropbear userspace with
   the Debian system's host key), proven by /proc/version against its manifest;
4. after the run the kernel and its entry are removed: its userspace has no grub, so the
   method's plain reboot brings the box back on Debian's kernel (proven), then update-grub;
5. a kernel that panics (an initrd whose /init cannot run) is "boot failed" with the panic on
   the console, and the power cycle brings the box back on Debian's kernel, cleaned up.
With KSERIES_GRUB_KERNEL=MANIFEST (a build with configs/distro-box.config), also a one-shot
boot of that kernel on the disk's own Debian userspace, without an initrd (systemd is PID 1, /
is the disk's ext4), its cleanup run there, then a plain reboot back on Debian's kernel.

Nothing is mocked. It takes 8 to 12 minutes under TCG (and about 3 minutes of image build when
cold, much more on a loaded machine), so it runs only with KSERIES_GRUB_TEST=1; it needs root
(the image is built with loop devices and a chroot).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kseries.config import Config
from kseries.paths import PROJECT
from kseries.testbox import boot, distro, initramfs, kernel, remote
from kseries.testbox.box import TestboxConfig
from kseries.testbox.machine import Machine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("KSERIES_GRUB_TEST"),
        reason="opt-in (8-12 min under TCG): set KSERIES_GRUB_TEST=1",
    ),
]

BOX = """
[box.{name}]
method = "grub-reboot"
host = "127.0.0.1"
port = {port}
identity = "{identity}"
known_hosts = "{known_hosts}"
power_cycle = "{power_cycle}"
console_log = "{console_log}"
initrd = "{initrd}"
timeouts = {{ connect = 10, boot = 900, test = 120 }}
"""
TESTS = """
[testbox]
default = "debian"

[[test]]
name = "identity"
command = "cat /proc/version /proc/cmdline /proc/1/comm; grep ' / ' /proc/mounts"
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
    """Three views of the one box: the series kernel on the image's initramfs, a kernel whose
    initrd panics, and (no initrd) a kernel that boots the disk's Debian userspace."""
    directory.mkdir(exist_ok=True)
    (directory / "series.toml").write_text((PROJECT / "configs" / "series.toml").read_text())
    panic = initramfs.Archive()
    panic.file("init", b"this is not a program\n", 0o755)  # the kernel cannot run it: panic
    (directory / "panic.cpio").write_bytes(panic.cpio())
    table = {k: str(v).replace('"', '\\"') for k, v in box.box_table().items()}
    text = TESTS
    for name, initrd in (
        ("debian", box.made.initramfs()),
        ("debian-panic", directory / "panic.cpio"),
        ("debian-disk", ""),
    ):
        text += BOX.format(name=name, initrd=initrd, **table)
    (directory / "testboxes.toml").write_text(text.replace('initrd = ""\n', ""))
    return Config.load(directory)


def _kernels() -> tuple[kernel.Kernel, kernel.Kernel]:
    """The test-box builds A and B (tests/test_testbox_qemu.py; cached): B is the kernel under
    test, A the one the panicking initrd is paired with."""
    from tests.test_testbox_qemu import build_test_kernels

    built = build_test_kernels()
    return tuple(kernel.load(str(p.parent / "manifest.json")) for p in (built.b, built.a))


def _on_box(config: Config, command: str) -> str:
    machine = Machine(TestboxConfig.load(config).box("debian"))
    try:
        machine.wait_for_ssh(30)
        return machine.remote().run(command, timeout=120, check=True).stdout
    finally:
        machine.disconnect()


def _gone(config: Config) -> bool:
    """Nothing of a test kernel is left on the box (run on its Debian system)."""
    left = _on_box(
        config,
        "ls -d /boot/kseries /etc/grub.d/45_kseries 2>&1; grep -c kseries /boot/grub/grub.cfg"
        " || true",
    )
    return left.count("No such file") == 2 and left.strip().endswith("0")


def test_grub_reboot_on_a_debian_box(debian: tuple[distro.DiskBox, Times], tmp_path: Path) -> None:
    box, times = debian
    series, other = _kernels()
    config = _config(box, tmp_path / "configs")
    settings = TestboxConfig.load(config)
    machine = Machine(settings.box("debian"), log=print)
    times("kernels and initramfs (cached)")

    # 1. Debian's own kernel, to SSH
    machine.wait_for_ssh(900, what="SSH on the Debian kernel")
    debian_kernel = boot.identify(machine.remote())
    machine.disconnect()
    assert "Debian" in debian_kernel.proc_version
    times("boot to SSH (Debian kernel)")

    # 2. stock GRUB_DEFAULT=0: refused with the fix, nothing installed
    _on_box(config, "sed -i 's/^GRUB_DEFAULT=.*/GRUB_DEFAULT=0/' /etc/default/grub")
    runs, _ = remote.test_remote(
        config, kernel_spec=str(series.path), out=str(tmp_path / "refused"), log=print
    )
    (refused,) = runs
    assert refused.verdict == "error"
    assert "GRUB_DEFAULT=0" in refused.reason and "grub-set-default" in refused.reason
    assert "GRUB_DEFAULT=saved" in refused.reason
    assert _gone(config)
    _on_box(config, "sed -i 's/^GRUB_DEFAULT=.*/GRUB_DEFAULT=saved/' /etc/default/grub")
    times("GRUB_DEFAULT=0 refused")

    # 3-4. one-shot boot of the series kernel, proven; then back on Debian, cleaned up
    runs, out = remote.test_remote(
        config, kernel_spec=str(series.path), out=str(tmp_path / "series"), log=print
    )
    (one_shot,) = runs
    assert one_shot.verdict == "pass", one_shot.reason
    assert series.matches(one_shot.after["proc_version"])
    assert one_shot.before["boot_id"] != one_shot.after["boot_id"]
    assert "panic=10" in one_shot.tests[0].stdout  # the test kernel's own command line
    assert {"upload", "update_grub", "shutdown", "boot", "cleanup"} <= set(one_shot.timings)
    console = (out / "debian" / "kernel" / "console.log").read_text()
    assert series.utsversion in console  # its banner, on the box's serial console
    back = _identity(machine)
    assert back.proc_version == debian_kernel.proc_version  # the plain reboot: saved entry
    assert back.boot_id not in (debian_kernel.boot_id, one_shot.after["boot_id"])
    assert _gone(config)
    t = one_shot.timings
    times(
        f"one-shot boot (upload {t['upload']:.0f}s, update-grub {t['update_grub']:.0f}s, "
        f"shutdown {t['shutdown']:.0f}s, to SSH {t['to_ssh']:.0f}s, tests {t['tests']:.0f}s), "
        f"then plain reboot to Debian and cleanup ({t['cleanup']:.0f}s)"
    )

    # 5. a panicking kernel: boot failed, console lines, power cycle, back on Debian's kernel
    runs, _ = remote.test_remote(
        config,
        boxes=["debian-panic"],
        kernel_spec=str(other.path),
        out=str(tmp_path / "panic"),
        log=print,
    )
    (panicked,) = runs
    assert panicked.verdict == "boot failed", panicked.reason
    assert "panicked" in panicked.reason
    assert any("Kernel panic" in line for line in panicked.console_tail)
    assert "socat" in panicked.recovery and "answers again" in panicked.recovery
    assert _identity(machine).proc_version == debian_kernel.proc_version
    assert _gone(config)
    times(f"panic, power cycle, fallback and cleanup (recovery: {panicked.recovery})")

    # optional: a kernel with configs/distro-box.config on the disk's Debian userspace
    disk_kernel = os.environ.get("KSERIES_GRUB_KERNEL")
    if disk_kernel:
        runs, _ = remote.test_remote(
            config,
            boxes=["debian-disk"],
            kernel_spec=disk_kernel,
            out=str(tmp_path / "disk"),
            log=print,
        )
        (disk,) = runs
        assert disk.verdict == "pass", disk.reason
        assert kernel.load(disk_kernel).matches(disk.after["proc_version"])
        # Debian's own userspace: systemd is PID 1 and / is the disk's ext4, not an initramfs
        shown = disk.tests[0].stdout.splitlines()
        assert "systemd" in shown, shown
        assert any(line.split()[1:3] == ["/", "ext4"] for line in shown[3:]), shown
        assert _gone(config)
        t = disk.timings
        times(
            f"one-shot boot of the distro-box kernel on the disk's own userspace (upload "
            f"{t['upload']:.0f}s, update-grub {t['update_grub']:.0f}s, shutdown "
            f"{t['shutdown']:.0f}s, to SSH {t['to_ssh']:.0f}s, tests {t['tests']:.0f}s, cleanup "
            f"on the test kernel {t['cleanup']:.0f}s)"
        )
        # its userspace has grub, so the cleanup ran there: the box is still on the test
        # kernel, and the next plain reboot is back on Debian's (the saved entry)
        machine.wait_for_ssh(60)
        machine.remote().start("reboot", wait=3)  # systemd's reboot returns at once
        machine.wait_until_down(600)
        machine.wait_for_ssh(900, what="SSH on Debian's kernel")  # a full boot, as in step 1
        back = _identity(machine)
        assert back.proc_version == debian_kernel.proc_version
        assert back.boot_id != disk.after["boot_id"]
        times("plain reboot back to Debian's kernel")


def _identity(machine: Machine) -> boot.Identity:
    try:
        machine.wait_for_ssh(60)
        return boot.identify(machine.remote())
    finally:
        machine.disconnect()
