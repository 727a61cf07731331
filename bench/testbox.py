"""bench/testbox: `invoke test-remote` on a warm box against the same steps done by hand, and
two boxes in parallel against one, in one run.

Both sides switch a running local QEMU box (a kexec box) to another kernel and judge it, taking
turns, several rounds, alternating kernels A and B so every round is a real switch:
  toolkit: `invoke test-remote --box bench-1 --kernel K --tests smoke` (a new process each time,
           so invoke's and Python's start-up count), to the printed verdict;
  by hand: ssh 'cat > /tmp/k' < K, ssh 'cat > /tmp/i' < initrd (skipped when the box already
           has it, as the toolkit skips it), ssh sha256sum, ssh kexec -l, ssh kexec -e (in the
           foreground, cut after 3 s), ssh in a 0.2 s loop until it answers, then ssh
           'cat /proc/version; cat boot_id', the smoke test and dmesg (one ssh each).
Parallel: `--boxes bench-1,bench-2` against `--box bench-1` (same steps, same kernels).
It prints the medians and both ratios; the target for the first is at most 1.2x.

The kernels are the test suite's A and B (~/.cache/kseries/tb-build/kernels, built by the
first slow test run, or here if missing). The boxes' state lives in ~/.cache/kseries/bench/.
Run: .venv/bin/python bench/testbox.py [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from kseries.config import Config  # noqa: E402
from kseries.paths import cache_dir  # noqa: E402
from kseries.testbox import local  # noqa: E402
from kseries.testbox.box import TestboxConfig  # noqa: E402
from kseries.testbox.qemu import QemuBox  # noqa: E402
from tests.test_testbox_qemu import build_test_kernels  # noqa: E402

TESTBOXES = """
[testbox]
default = "bench-1"

[box.bench-1]
method = "kexec"
cmdline = "console=ttyS0 panic=-1"
qemu = {{ cpu = "max", state_dir = "{state}/bench-1" }}

[box.bench-2]
method = "kexec"
cmdline = "console=ttyS0 panic=-1"
qemu = {{ cpu = "max", state_dir = "{state}/bench-2" }}

[[test]]
name = "smoke"
command = "cat /proc/version && test -c /dev/kvm && echo /dev/kvm present"
timeout = 30
"""
SMOKE = "cat /proc/version && test -c /dev/kvm && echo /dev/kvm present"


def toolkit(configs: Path, kernel: Path, *boxes: str) -> float:
    option = ["--boxes", ",".join(boxes)] if len(boxes) > 1 else ["--box", boxes[0]]
    started = time.perf_counter()
    done = subprocess.run(
        [
            str(PROJECT / ".venv/bin/invoke"),
            "-r",
            str(PROJECT),
            "test-remote",
            *option,
            "--kernel",
            str(kernel),
            "--tests",
            "smoke",
            "--out",
            str(configs.parent / "out"),
        ],
        env={**os.environ, "KSERIES_CONFIG_DIR": str(configs)},
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"test-remote failed:\n{done.stdout}\n{done.stderr}")
    return took


class ByHand:
    """The same steps as a careful person types them, with OpenSSH's ssh."""

    def __init__(self, box: QemuBox) -> None:
        ssh_box = box.ssh_box()
        self.ssh = [
            "ssh",
            "-q",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={ssh_box.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=3",
            "-i",
            str(ssh_box.identity),
            "-p",
            str(ssh_box.port),
            "root@127.0.0.1",
        ]
        self.initrd = box.initramfs()
        self.cmdline = box.kernel_cmdline("")

    def __call__(self, kernel: Path) -> float:
        ssh = self.ssh
        started = time.perf_counter()
        before = self.out("cat /proc/sys/kernel/random/boot_id")
        with kernel.open("rb") as f:
            subprocess.run([*ssh, "cat > /tmp/k"], stdin=f, check=True)
        have = self.out("sha256sum /tmp/i 2>/dev/null || true").split()
        sha = subprocess.run(
            ["sha256sum", str(self.initrd)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        if not have or have[0] != sha:
            with self.initrd.open("rb") as f:
                subprocess.run([*ssh, "cat > /tmp/i"], stdin=f, check=True)
        self.out("sha256sum /tmp/k /tmp/i")
        self.out(f"kexec -l /tmp/k --initrd=/tmp/i --append='{self.cmdline}'")
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([*ssh, "kexec -e"], timeout=3, capture_output=True)
        while subprocess.run([*ssh, "true"], capture_output=True).returncode != 0:
            time.sleep(0.2)
        after = self.out("cat /proc/version; cat /proc/sys/kernel/random/boot_id")
        assert before.strip() != after.split("\n")[1].strip(), "the box did not reboot"
        self.out(SMOKE)
        self.out("dmesg")
        return time.perf_counter() - started

    def out(self, command: str) -> str:
        return subprocess.run(
            [*self.ssh, command], capture_output=True, text=True, check=True
        ).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    kernels = build_test_kernels()
    state = cache_dir() / "bench"
    with tempfile.TemporaryDirectory(prefix="kseries-bench-") as scratch:
        configs = Path(scratch) / "configs"
        configs.mkdir()
        shutil.copyfile(PROJECT / "configs" / "series.toml", configs / "series.toml")
        (configs / "testboxes.toml").write_text(TESTBOXES.format(state=state))
        settings = TestboxConfig.load(Config.load(configs))
        boxes = [settings.box("bench-1"), settings.box("bench-2")]
        try:
            for box in boxes:  # warm: running on kernel A
                local.up(box, kernel_spec=str(kernels.a), restart=True, log=lambda _: None)
            by_hand = ByHand(QemuBox(boxes[0]))
            # One untimed round each, so both sides start from the same warm state.
            toolkit(configs, kernels.b, "bench-1")
            by_hand(kernels.a)
            times: dict[str, list[float]] = {"toolkit": [], "hand": [], "one": [], "two": []}
            kernel_cycle = [kernels.b, kernels.a]
            for number in range(rounds):
                times["toolkit"].append(toolkit(configs, kernel_cycle[0], "bench-1"))
                times["hand"].append(by_hand(kernel_cycle[1]))
                print(
                    f"round {number + 1}: toolkit {times['toolkit'][-1]:.2f}s, "
                    f"by hand {times['hand'][-1]:.2f}s",
                    flush=True,
                )
            for number in range(rounds):
                kernel = kernel_cycle[number % 2]
                times["one"].append(toolkit(configs, kernel, "bench-1"))
                other = kernel_cycle[(number + 1) % 2]
                times["two"].append(toolkit(configs, other, "bench-1", "bench-2"))
                print(
                    f"round {number + 1}: one box {times['one'][-1]:.2f}s, "
                    f"two boxes {times['two'][-1]:.2f}s",
                    flush=True,
                )
        finally:
            for box in boxes:
                local.down(box, log=lambda _: None)
    median = {k: statistics.median(v) for k, v in times.items()}
    print()
    print(f"warm box, kexec switch + identity + smoke test + dmesg ({rounds} rounds, medians):")
    rows = [
        ("invoke test-remote", median["toolkit"], "s"),
        ("by hand (ssh, cat, kexec)", median["hand"], "s"),
        ("ratio (target <= 1.2x)", median["toolkit"] / median["hand"], "x"),
    ]
    for label, value, unit in rows:
        print(f"  {label:<28}{value:6.2f}{unit}")
    print("parallel boxes (invoke test-remote, same steps):")
    rows = [
        ("one box", median["one"], "s"),
        ("two boxes", median["two"], "s"),
        (f"ratio (ideal 1.0x; {os.cpu_count()} CPUs)", median["two"] / median["one"], "x"),
    ]
    for label, value, unit in rows:
        print(f"  {label:<28}{value:6.2f}{unit}")


if __name__ == "__main__":
    main()
