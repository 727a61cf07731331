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
