"""The C programs that run inside test boxes build cleanly and skip cleanly off a box."""

from __future__ import annotations

import subprocess
from pathlib import Path

BOX = Path(__file__).parent / "box"


def test_vfio_bar_race_builds_static_and_skips_without_a_device(tmp_path: Path) -> None:
    build = subprocess.run(
        ["make", "-C", str(BOX), f"O={tmp_path}"], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr
    assert "warning" not in build.stderr.lower()
    binary = tmp_path / "vfio_bar_race"
    assert (
        "statically linked"
        in subprocess.run(["file", str(binary)], capture_output=True, text=True).stdout
    )
    # This machine has no edu device (and its /dev/kvm cannot run ordinary guests): the
    # reproducer must say so and exit with kselftest's SKIP code, never pass or fail.
    run = subprocess.run([str(binary), "--cycles", "1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 4, run.stdout + run.stderr  # KSFT_SKIP
    assert "vfio-bar-race: result=SKIP" in run.stdout
    # a real box names its device in the box config ({vfio_device}): a missing one is a SKIP too
    run = subprocess.run(
        [str(binary), "--bdf", "0000:ff:1f.7"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 4 and 'reason="no PCI device 0000:ff:1f.7"' in run.stdout


def test_the_pair_driver_checks_its_arguments_and_skips_without_a_device(tmp_path: Path) -> None:
    """vfio-bar-race-qemu.sh (busybox sh on L1) off a box: bad arguments are an error line
    with exit 2, firmware given as NAME=PATH files becomes a -L directory of links, and with
    no edu device it is a SKIP with the reason, as vfio_bar_race's."""
    build = subprocess.run(
        ["make", "-C", str(BOX), f"O={tmp_path}"], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr
    assert (
        "statically linked"
        in subprocess.run(
            ["file", str(tmp_path / "bar_race_guest")], capture_output=True, text=True
        ).stdout
    )
    driver = tmp_path / "vfio-bar-race-qemu.sh"
    assert driver.read_bytes() == (BOX / "vfio-bar-race-qemu.sh").read_bytes()
    fake_qemu = tmp_path / "qemu"
    fake_qemu.write_text("#!/bin/sh\nexit 0\n")
    fake_qemu.chmod(0o755)
    (tmp_path / "bios.bin").write_bytes(b"bios")
    common = [
        "sh", str(driver), "--qemu-stock", str(fake_qemu), "--qemu-patched", str(fake_qemu),
        "--kernel", str(tmp_path / "bios.bin"), "--guest", str(tmp_path / "bar_race_guest"),
        "--workdir", str(tmp_path / "work"), "--firmware", f"bios-256k.bin={tmp_path}/bios.bin",
    ]  # fmt: skip
    bad = subprocess.run([*common, "--cycles", "many"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--cycles 'many' is not a number" in bad.stdout + bad.stderr
    run = subprocess.run([*common, "--bdf", "0000:ff:1f.7"], capture_output=True, text=True)
    assert run.returncode == 4, run.stdout + run.stderr
    assert "vfio-bar-race-qemu: result=SKIP" in run.stdout.splitlines()[-1]
    link = tmp_path / "work" / "firmware" / "bios-256k.bin"
    assert link.is_symlink() and link.read_bytes() == b"bios"
