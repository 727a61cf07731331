"""End to end on a real local QEMU box (TCG here): boot a built kernel, prove it, run a test
(a KVM selftest built from the tree), collect dmesg, switch kernels with kexec and prove the
switch, survive a kernel that panics and one that never answers, stop the box.

Two kernels of the embedded 7.2 tree, built once into ~/.cache/kseries/tb-build (tinyconfig +
the [build] fragments of configs/toolkit.toml, as `invoke build` makes them, so ccache serves
one from the other) and kept: A (#1) and B, the same build relinked as #2, so the two differ
exactly in what /proc/version shows. Cold, that is one kernel build (about 5 minutes on 2 idle
cores, less after `invoke build`'s); warm, nothing. Nothing is mocked.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kseries.config import Config
from kseries.paths import PROJECT, cache_dir
from kseries.testbox import initramfs, kernel, local, remote
from kseries.testbox.box import TestboxConfig

pytestmark = pytest.mark.slow

FRAGMENTS = [
    PROJECT / "configs" / f"{name}.config"
    for name in Config.load(PROJECT / "configs").table("build")["fragments"]
]
STAMP = "Thu Jan 1 00:00:00 UTC 2026"


@dataclass(frozen=True)
class Kernels:
    a: Path
    b: Path
    tree: Path


def _make(tree: Path, out: Path, *args: str) -> None:
    env = {**os.environ, "CCACHE_BASEDIR": str(cache_dir())}
    cc = ["CC=ccache gcc"] if shutil.which("ccache") else []
    subprocess.run(
        ["make", "-s", "-C", str(tree), f"O={out}", f"-j{os.cpu_count() or 1}", *cc, *args],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def _manifest(image: Path, tree: Path) -> None:
    """A manifest next to the image, in the build stage's shape, so the recipe tests know
    which tree to build from."""
    data = image.read_bytes()
    release, uts = kernel.image_version(data)
    commit = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    manifest = {
        "tree": str(tree),
        "commit": commit,
        "kernelrelease": release,
        "utsversion": uts,
        "bzimage": {
            "path": str(image),
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        },
    }
    (image.parent / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.fixture(scope="session")
def kernels() -> Kernels:
    return build_test_kernels()


def build_test_kernels() -> Kernels:
    """Kernels A and B (also used by bench/testbox.py); built once, then reused."""
    from kseries.tree import prepare_default_tree

    tree = prepare_default_tree(log=lambda _: None).path
    root = cache_dir() / "tb-build"
    out = root / "linux"  # two levels below the cache, like the build stage's: ccache hits
    key = hashlib.sha256(b"".join(f.read_bytes() for f in FRAGMENTS)).hexdigest()[:12]
    images = {name: root / "kernels" / key / name / "bzImage" for name in ("A", "B")}
    stamp = root / "config.key"  # which fragments out/.config was made from
    root.mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(p.is_file() for p in images.values()):
            if not (out / ".config").is_file() or not stamp.is_file() or stamp.read_text() != key:
                _make(tree, out, "tinyconfig")
                subprocess.run(
                    [
                        str(tree / "scripts/kconfig/merge_config.sh"),
                        "-m",
                        "-O",
                        str(out),
                        str(out / ".config"),
                        *map(str, FRAGMENTS),
                    ],
                    check=True,
                    capture_output=True,
                )
                _make(tree, out, "olddefconfig")
                stamp.write_text(key)
            for number, name in enumerate(("A", "B"), 1):
                _make(
                    tree,
                    out,
                    f"KBUILD_BUILD_VERSION={number}",
                    f"KBUILD_BUILD_TIMESTAMP={STAMP}",
                    "bzImage",
                )
                images[name].parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / "arch/x86/boot/bzImage", images[name])
        for image in images.values():
            _manifest(image, tree)
    return Kernels(images["A"], images["B"], tree)


TESTBOXES = """
[testbox]
default = "e2e"
keep_warm = true  # the tests below go on with the boxes an earlier one started

[box.e2e]
method = "kexec"
cmdline = "console=ttyS0 panic=-1"
qemu = {{ cpu = "max", state_dir = "{state}" }}
timeouts = {{ connect = 10, boot = 150, test = 120 }}

[box.e2e-panic]
method = "kexec"
cmdline = "console=ttyS0 panic=-1"
initrd = "{panic_initrd}"
qemu = {{ cpu = "max", state_dir = "{state}" }}
timeouts = {{ connect = 10, boot = 150, test = 120 }}

[box.e2e-second]
method = "qemu"
cmdline = "console=ttyS0 panic=-1"
qemu = {{ cpu = "qemu64,+svm", state_dir = "{state}-second" }}
timeouts = {{ connect = 10, boot = 150, test = 120 }}

[box.e2e-legacy-tdp]
method = "qemu"
cmdline = "console=ttyS0 panic=-1"
kvm_params = {{ "kvm.tdp_mmu" = "0" }}
qemu = {{ cpu = "max", state_dir = "{state}-legacy" }}
timeouts = {{ connect = 10, boot = 150, test = 120 }}

[box.e2e-mute]
method = "kexec"
cmdline = "console=ttyS0 panic=-1"
initrd = "{mute_initrd}"
power_cycle = "{power_cycle}"
qemu = {{ cpu = "max", state_dir = "{state}" }}
timeouts = {{ connect = 10, boot = 25, test = 120 }}

[recipe.kvm-selftest]
headers = true
command = "make -s -C {{tree}}/tools/testing/selftests/kvm OUTPUT={{out}} KHDR_INCLUDES=\\"-isystem {{headers}}\\" LDFLAGS=-static -j{{jobs}} {{out}}/{{target}}"
output = "{{out}}/{{target}}"

[[test]]
name = "smoke"
command = "cat /proc/version && test -c /dev/kvm"
timeout = 30

[[test]]
name = "userspace_io_test"
recipe = "kvm-selftest"
target = "x86/userspace_io_test"
timeout = 120

[[test]]
name = "hangs"
command = "echo going to sleep; sleep 600"
timeout = 3
default = false
"""  # noqa: E501


@dataclass
class Lab:
    config: Config
    settings: TestboxConfig
    state: Path
    marker: Path
    out: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, kernels: Kernels) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("e2e")
    configs = root / "configs"
    configs.mkdir()
    shutil.copyfile(PROJECT / "configs" / "series.toml", configs / "series.toml")
    state = root / "state"
    keys = initramfs.Keys(state / "keys").ensure()
    panic = initramfs.Archive()
    panic.file("init", b"this is not a program\n", 0o755)  # the kernel cannot run it: panic
    (root / "panic.cpio").write_bytes(panic.cpio())
    rc_only = initramfs.INITTAB.splitlines()[0] + "\n"  # mounts and network, but no sshd
    initramfs.build(root / "mute.cpio.gz", keys, inittab=rc_only)
    marker = root / "power-cycled"
    script = root / "power-cycle.sh"
    script.write_text(f'#!/bin/sh\necho "power cycle of $KSERIES_BOX" >> {marker}\n')
    script.chmod(0o755)
    (configs / "testboxes.toml").write_text(
        TESTBOXES.format(
            state=state,
            panic_initrd=root / "panic.cpio",
            mute_initrd=root / "mute.cpio.gz",
            power_cycle=script,
        )
    )
    config = Config.load(configs)
    lab = Lab(config, TestboxConfig.load(config), state, marker, root / "out")
    yield lab
    for name in ("e2e", "e2e-second", "e2e-legacy-tdp"):  # also after a failure
        local.down(lab.settings.box(name), log=lambda _: None)


def test_up_boots_the_kernel_and_proves_it(lab: Lab, kernels: Kernels) -> None:
    box = lab.settings.box("e2e")
    status = local.up(box, kernel_spec=str(kernels.a), log=lambda _: None)
    a = kernel.load(str(kernels.a))
    assert status.running and a.matches(status.proc_version)
    assert status.accel in ("tcg", "kvm") and status.port > 0
    assert "tsc_early_khz=" in lab.state.joinpath("state.json").read_text() or status.accel == "kvm"
    assert local.up(box, log=lambda _: None).pid == status.pid  # already running: kept


def test_kexec_switch_runs_a_selftest_and_collects_dmesg(lab: Lab, kernels: Kernels) -> None:
    runs, out = remote.test_remote(
        lab.config,
        kernel_spec=str(kernels.b),
        tests=["smoke", "userspace_io_test"],
        out=str(lab.out / "b"),
        log=print,
    )
    (run,) = runs
    b = kernel.load(str(kernels.b))
    assert run.verdict == "pass", run.reason
    assert b.matches(run.after["proc_version"])
    assert run.before["boot_id"] != run.after["boot_id"]
    assert kernel.load(str(kernels.a)).matches(run.before["proc_version"])
    assert [t.status for t in run.tests] == ["pass", "pass"]
    assert run.kvm and run.kvm.mmu == "TDP MMU" and run.kvm.npt is True  # read on the box
    assert "Linux version" in (out / "e2e" / "kernel" / "dmesg.txt").read_text()
    assert "kvm_amd" in (out / "e2e" / "kernel" / "dmesg.txt").read_text()
    console = (out / "e2e" / "kernel" / "console.log").read_text()
    assert b.utsversion in console  # the new kernel's own banner, on the serial console
    report = json.loads((out / "report.json").read_text())
    assert report["runs"][0]["verdict"] == "pass"
    assert (out / "junit.xml").read_text().count("<testcase") == 4  # boot, 2 tests, dmesg


def test_kexec_back_and_a_hung_test_times_out(lab: Lab, kernels: Kernels) -> None:
    runs, _ = remote.test_remote(
        lab.config,
        kernel_spec=str(kernels.a),
        tests=["hangs", "smoke"],
        out=str(lab.out / "a"),
        log=print,
    )
    (run,) = runs
    assert kernel.load(str(kernels.a)).matches(run.after["proc_version"])
    assert kernel.load(str(kernels.b)).matches(run.before["proc_version"])
    hangs, smoke = run.tests
    assert hangs.status == "timeout" and hangs.stdout == "going to sleep\n"
    assert hangs.duration < 20  # killed on the box at 3 s, not left to the client's grace
    assert smoke.status == "pass"  # the box is fine afterwards
    assert run.verdict == "fail" and "hangs timeout" in run.reason


def test_kernel_that_panics_ends_in_boot_failed_and_the_box_comes_back(
    lab: Lab, kernels: Kernels
) -> None:
    runs, _ = remote.test_remote(
        lab.config,
        boxes=["e2e-panic"],
        kernel_spec=str(kernels.b),
        tests=["smoke"],
        out=str(lab.out / "panic"),
        log=print,
    )
    (run,) = runs
    assert run.verdict == "boot failed"
    assert "QEMU exited" in run.reason
    assert any("Kernel panic" in line for line in run.console_tail)
    assert "known-good" in run.recovery and "answers again" in run.recovery
    status = local.status(lab.settings.box("e2e"), log=lambda _: None)
    assert status.running and kernel.load(str(kernels.a)).matches(status.proc_version)


def test_kernel_that_never_answers_times_out_and_is_power_cycled(
    lab: Lab, kernels: Kernels
) -> None:
    runs, _ = remote.test_remote(
        lab.config,
        boxes=["e2e-mute"],
        kernel_spec=str(kernels.b),
        tests=["smoke"],
        out=str(lab.out / "mute"),
        log=print,
    )
    (run,) = runs
    assert run.verdict == "boot failed"
    assert "no SSH on the new kernel after 25s" in run.reason
    assert any("kseries-box: userspace up" in line for line in run.console_tail)
    assert lab.marker.read_text() == "power cycle of e2e-mute\n"
    assert "exit 0" in run.recovery and "answers again" in run.recovery
    status = local.status(lab.settings.box("e2e"), log=lambda _: None)
    assert status.running and kernel.load(str(kernels.a)).matches(status.proc_version)


def test_compare_shows_both_kernels_side_by_side(lab: Lab, kernels: Kernels) -> None:
    runs, out = remote.test_remote(
        lab.config,
        kernel_spec=str(kernels.a),
        compare=str(kernels.b),
        tests=["smoke"],
        out=str(lab.out / "compare"),
        log=print,
    )
    ref, tested = runs
    assert (ref.label, tested.label) == ("ref B", "kernel")
    assert kernel.load(str(kernels.b)).matches(ref.after["proc_version"])
    assert kernel.load(str(kernels.a)).matches(tested.after["proc_version"])
    assert ref.after["boot_id"] == tested.before["boot_id"]  # one box, switched twice
    assert ref.verdict == tested.verdict == "pass"
    assert [r["label"] for r in json.loads((out / "report.json").read_text())["runs"]] == [
        ref.label,
        "kernel",
    ]


def test_two_boxes_run_in_parallel(lab: Lab, kernels: Kernels) -> None:
    """The second box (shadow MMU) is down: method qemu starts it on the kernel directly."""
    runs, _ = remote.test_remote(
        lab.config,
        boxes=["e2e", "e2e-second"],
        kernel_spec=str(kernels.b),
        tests=["smoke"],
        out=str(lab.out / "parallel"),
        log=print,
    )
    assert [(r.box, r.verdict) for r in runs] == [("e2e", "pass"), ("e2e-second", "pass")]
    second = runs[1]
    assert second.before is None  # started fresh, so there is no earlier boot_id
    assert "-cpu qemu64,+svm" in (lab.state.parent / "state-second" / "qemu.log").read_text()
    assert [r.kvm.mmu for r in runs if r.kvm] == ["TDP MMU", "shadow MMU"]
    assert local.down(lab.settings.box("e2e-second"), log=lambda _: None)


def test_boxes_the_run_started_are_stopped_at_its_end(lab: Lab, kernels: Kernels) -> None:
    """Without keep_warm the run stops the box it started (e2e-second) and names the one that
    was running before it (e2e), with the command that stops it."""
    second = lab.settings.box("e2e-second")
    assert not local.status(second, log=lambda _: None).running
    lines: list[str] = []
    runs, _ = remote.test_remote(
        lab.config,
        boxes=["e2e", "e2e-second"],
        kernel_spec=str(kernels.b),
        tests=["smoke"],
        out=str(lab.out / "stopped"),
        keep_warm=False,
        log=lines.append,
    )
    assert [r.verdict for r in runs] == ["pass", "pass"]
    assert not local.status(second, log=lambda _: None).running
    assert local.status(lab.settings.box("e2e"), log=lambda _: None).running
    assert (
        "box e2e is still running (it was running before this run): "
        "stop it with `invoke testbox.down --box e2e`"
    ) in lines


def test_down_stops_the_box_by_its_pid(lab: Lab) -> None:
    box = lab.settings.box("e2e")
    pid = local.status(box, log=lambda _: None).pid
    assert local.down(box, log=lambda _: None)
    assert (
        not Path(f"/proc/{pid}").exists() or "qemu" not in Path(f"/proc/{pid}/cmdline").read_text()
    )
    assert not local.status(box, log=lambda _: None).running
    assert not local.down(box, log=lambda _: None)


PARALLEL_BOXES = """
[testbox]
default = "p1"
""" + "".join(
    f"""
[box.p{n}]
method = "qemu"
cmdline = "console=ttyS0 panic=-1"
qemu = {{ cpu = "max", memory = "256M" }}
timeouts = {{ connect = 10, boot = 150, test = 60 }}
"""
    for n in (1, 2, 3)
)


@pytest.mark.parametrize("count", [2, 3])
def test_boxes_started_at_once_from_an_empty_cache(
    kernels: Kernels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """What a fresh machine's first `invoke pipeline` does: boxes starting in parallel, each
    needing the shared host and client keys and initramfs that nobody has made yet."""
    from concurrent.futures import ThreadPoolExecutor

    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copyfile(PROJECT / "configs" / "series.toml", configs / "series.toml")
    (configs / "testboxes.toml").write_text(PARALLEL_BOXES)
    settings = TestboxConfig.load(Config.load(configs))
    names = [f"p{n}" for n in range(1, count + 1)]
    for round_ in range(10):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"cache-{round_}"))
        boxes = [settings.box(name) for name in names]
        try:
            with ThreadPoolExecutor(len(boxes)) as pool:
                futures = [
                    pool.submit(local.up, box, kernel_spec=str(kernels.a), log=lambda _: None)
                    for box in boxes
                ]
                statuses = [f.result() for f in futures]
        finally:
            for box in boxes:
                local.down(box, log=lambda _: None)
        a = kernel.load(str(kernels.a))
        assert all(s.running and a.matches(s.proc_version) for s in statuses), round_


def test_the_legacy_tdp_box_runs_the_legacy_tdp_mmu(lab: Lab, kernels: Kernels) -> None:
    """kvm_params reach the kernel command line and the MMU is read back from the box: sysfs
    shows kvm.tdp_mmu=N with NPT on, which is KVM's legacy TDP MMU (direct_map())."""
    runs, out = remote.test_remote(
        lab.config,
        boxes=["e2e-legacy-tdp"],
        kernel_spec=str(kernels.b),
        tests=["smoke", "userspace_io_test"],
        out=str(lab.out / "legacy"),
        keep_warm=False,
        log=print,
    )
    (run,) = runs
    assert run.verdict == "pass", run.reason
    assert run.kvm and run.kvm.mmu == "legacy TDP MMU"
    assert (run.kvm.tdp_mmu, run.kvm.npt, run.kvm.mismatches) == (False, True, ())
    assert "kvm.tdp_mmu=0" in (lab.state.parent / "state-legacy" / "qemu.log").read_text()
    written = json.loads((out / "report.json").read_text())["runs"][0]["kvm"]
    assert written["mmu"] == "legacy TDP MMU" and written["params"]["kvm.tdp_mmu"] == "N"
    assert written["cpu"]  # the model name from the box's /proc/cpuinfo
