"""The test-box stage's pure parts: config parsing, the initramfs archive, kernel identity,
the dmesg scan, the grub entry lookup, reports. Fast; no box, no network."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.paths import PROJECT
from kseries.testbox import boot, initramfs, kernel, remote, report, runner, suite
from kseries.testbox.box import TestboxConfig, parse_box
from kseries.testbox.qemu import QemuBox


def configs(tmp_path: Path, testboxes: str) -> Config:
    directory = tmp_path / "configs"
    directory.mkdir(exist_ok=True)
    (directory / "series.toml").write_text("")
    (directory / "testboxes.toml").write_text(testboxes)
    return Config.load(directory)


def fake_bzimage(
    version: bytes = b"7.2.13+ (u@h) #9 SMP PREEMPT Thu Jan  1 00:00:00 UTC 2026",
) -> bytes:
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    data[0x400 : 0x400 + len(version) + 1] = version + b"\0"
    return bytes(data)


# --- boxes -------------------------------------------------------------------------------------


def test_project_testboxes_parse() -> None:
    settings = TestboxConfig.load(Config.load(PROJECT / "configs"))
    local = settings.box("local")
    assert local.method == "qemu" and local.qemu and local.qemu.cpu == "max"
    assert settings.box("local-shadow").kvm_claims == {"kvm_amd.npt": "0"}
    tests = suite.load_tests(settings)
    names = [t.name for t in suite.select(tests, [])]
    assert names[:2] == ["smoke", "memory_fault_exit_test"]
    assert "set_memory_region_test" not in names  # default = false
    recipe = next(t for t in tests if t.name == "memory_fault_exit_test").recipe
    assert recipe and recipe.headers and "LDFLAGS=-static" in recipe.command
    race = next(t for t in tests if t.name == "vfio-bar-race")
    assert race.is_soak and race.default and "{project}/tests/box" in race.recipe.command
    for name in ("local", "local-shadow", "local-viommu"):
        assert "edu" in settings.box(name).qemu.extra_args  # the device vfio-bar-race takes
    assert "kvm_mmu_faultin_pfn" in settings.settings()["trace"]


def test_box_errors_name_the_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match=r"\[box.x\]: unknown setting colour"):
        parse_box("x", {"method": "kexec", "colour": "red"}, tmp_path, "testboxes.toml [box.x]")
    with pytest.raises(ToolkitError, match="method 'ssh' is not one of"):
        parse_box("x", {"method": "ssh"}, tmp_path, "[box.x]")
    with pytest.raises(ToolkitError, match="needs host, identity, known_hosts"):
        parse_box("x", {"method": "kexec"}, tmp_path, "[box.x]")
    with pytest.raises(ToolkitError, match="accel must be"):
        parse_box("x", {"qemu": {"accel": "hvf"}}, tmp_path, "[box.x]")
    with pytest.raises(ToolkitError, match=r"\[box.x.qemu\].*tcg_thread must be multi or single"):
        parse_box("x", {"qemu": {"tcg_thread": "two"}}, tmp_path, "[box.x]")


def test_a_box_qemu_from_a_series_must_name_one(tmp_path: Path) -> None:
    """qemu.binary = "series:NAME" names a series directory under configs/; a typo is one
    line naming the file, table and key, with the series there are."""
    (tmp_path / "outer").mkdir()
    (tmp_path / "outer" / "series.toml").write_text("")
    box = parse_box("x", {"qemu": {"binary": "series:outer"}}, tmp_path, "[box.x]")
    assert box.qemu and box.qemu.binary == "series:outer"
    for name in ("outre", "../outer", ""):
        with pytest.raises(ToolkitError, match=r"\[box.x.qemu\]: binary 'series:.*no series") as e:
            parse_box("x", {"qemu": {"binary": f"series:{name}"}}, tmp_path, "[box.x]")
        assert "\n" not in e.value.message and e.value.hint.endswith("here: outer")


def test_the_pipeline_runs_are_data_checked_before_any_stage(tmp_path: Path) -> None:
    """[[pipeline.run]]: the three MMUs, then the pair; the series those runs build, the
    box's QEMU first; a wrong box, test or key is refused with the file and row."""
    from kseries.testbox import plan

    settings = TestboxConfig.load(Config.load(PROJECT / "configs"))
    runs = plan.runs(settings)
    assert [r.boxes for r in runs] == [
        ("local", "local-legacy-tdp", "local-shadow"),
        ("local-pair",),
    ]
    assert runs[1].tests == ("vfio-bar-race-qemu",)
    assert plan.series_used(settings, runs) == ["outer-qemu", "qemu"]
    assert plan.series_used(settings, runs[:1]) == []
    box, row = "[box.a]\nqemu = {}\n", r"\[\[pipeline.run\]\] #1"
    cases = {
        '[[pipeline.run]]\nboxes = ["b"]\n': "no test box 'b'",
        '[[pipeline.run]]\nboxes = ["a"]\ntests = ["nope"]\n': "unknown test nope",
        '[[pipeline.run]]\nboxes = ["a"]\nbox = "a"\n': row + ": unknown setting box",
        '[[pipeline.run]]\ntests = ["smoke"]\n': row + ": a run needs boxes",
        '[pipeline]\nrun = "a"\n': "run must be an array of tables",
    }
    for text, message in cases.items():
        with pytest.raises(ToolkitError, match=message):
            plan.runs(TestboxConfig.load(configs(tmp_path, box + text)))
    assert plan.runs(TestboxConfig.load(configs(tmp_path, box))) == [plan.TestRun(("",))]


def test_a_single_threaded_tcg_box_says_so_on_qemus_command_line(tmp_path: Path) -> None:
    """The pair box's outer TCG runs with one thread (multi-threaded TCG loses nested-SVM
    state, README); under KVM, and by default, -accel is as it was."""
    single = QemuBox(parse_box("x", {"qemu": {"tcg_thread": "single"}}, tmp_path, "[box.x]"))
    default = QemuBox(parse_box("y", {"qemu": {}}, tmp_path, "[box.y]"))
    args = (tmp_path / "bzImage", tmp_path / "initrd", "console=ttyS0", 2222)
    assert "tcg,thread=single" in single.command(*args, "tcg")
    assert single.command(*args, "kvm")[3:5] == ["-accel", "kvm"]
    assert default.command(*args, "tcg")[3:5] == ["-accel", "tcg"]


def test_remote_box_paths_are_relative_to_configs(tmp_path: Path) -> None:
    box = parse_box(
        "lab",
        {
            "method": "grub-reboot",
            "host": "h",
            "identity": "keys/id",
            "known_hosts": "kh",
            "power_cycle": "ipmitool chassis power cycle",
            "console_log": "/var/log/conserver/lab.log",
            "timeouts": {"boot": 600},
        },
        tmp_path,
        "[box.lab]",
    )
    assert box.identity == tmp_path / "keys/id" and box.known_hosts == tmp_path / "kh"
    assert box.console_log == Path("/var/log/conserver/lab.log")
    assert box.timeouts.boot == 600 and box.timeouts.connect == 10 and box.port == 22
    assert box.address() == "root@h:22"


def test_local_toml_boxes_merge_over_testboxes(tmp_path: Path) -> None:
    config = configs(tmp_path, '[testbox]\ndefault = "a"\n[box.a]\nqemu = {}\n')
    (config.directory / "local.toml").write_text(
        '[testbox]\ndefault = "b"\n[box.b]\nmethod = "kexec"\nhost = "b"\nidentity = "i"\n'
        'known_hosts = "k"\n'
    )
    settings = TestboxConfig.load(Config.load(config.directory))
    assert settings.names() == ["a", "b"] and settings.box().name == "b"


# --- tests as data ---------------------------------------------------------------------------


def test_tests_need_exactly_one_kind(tmp_path: Path) -> None:
    bad = [
        '[[test]]\nname = "t"\n',
        '[[test]]\nname = "t"\ncommand = "true"\nbinary = "x"\n',
        '[[test]]\nname = "t"\nrecipe = "nope"\ntarget = "x"\n',
        '[[test]]\nname = "t"\ncommand = "a"\n[[test]]\nname = "t"\ncommand = "b"\n',
        '[[test]]\nname = "t"\ncommand = "a"\ntimout = 3\n',
    ]
    for text in bad:
        with pytest.raises(ToolkitError):
            suite.load_tests(TestboxConfig.load(configs(tmp_path, text)))
    tests = suite.load_tests(
        TestboxConfig.load(configs(tmp_path, '[[test]]\nname = "a"\ncommand = "true"\n'))
    )
    with pytest.raises(ToolkitError, match="unknown test b"):
        suite.select(tests, ["b"])


def test_recipe_builds_into_its_own_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    text = (
        '[recipe.cc]\ncommand = "gcc -static -O2 -o {out}/hello {tree}/{target}"\n'
        'output = "{out}/hello"\n'
        '[[test]]\nname = "hello"\nrecipe = "cc"\ntarget = "hello.c"\n'
        '[[test]]\nname = "broken"\nrecipe = "cc"\ntarget = "missing.c"\n'
    )
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.c").write_text("int main(void) { return 0; }\n")
    specs = suite.load_tests(TestboxConfig.load(configs(tmp_path, text)))
    builder = suite.Builder(tree)
    hello, broken = (builder.build(s) for s in specs)
    assert hello.data and hello.data[:4] == b"\x7fELF" and not hello.error
    assert hello.source and hello.source.is_relative_to(tmp_path / "cache")
    assert "building cc missing.c failed" in broken.error and broken.data is None


# --- the initramfs -----------------------------------------------------------------------------


def test_cpio_archive_is_valid_and_reproducible(tmp_path: Path) -> None:
    archive = initramfs.Archive()
    archive.file("etc/rc", b"#!/bin/sh\n", 0o755)
    archive.symlink("init", "/bin/busybox")
    archive.chardev("dev/console", 5, 1)
    data = archive.cpio()
    assert data == archive.cpio()
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True).stdout
    text = listing.decode()
    assert "crw-------" in text and "dev/console" in text
    assert "init -> /bin/busybox" in text and "-rwxr-xr-x" in text


def test_initramfs_has_the_box_userspace(tmp_path: Path) -> None:
    keys = initramfs.Keys(tmp_path / "keys").ensure()
    image = initramfs.build(tmp_path / "initramfs.cpio.gz", keys)
    stamp = image.with_name(image.name + ".inputs").read_text()
    assert (
        initramfs.build(image, keys) == image
        and image.with_name(image.name + ".inputs").read_text() == stamp
    )
    names = (
        subprocess.run(
            ["cpio", "-it"],
            input=gzip.decompress(image.read_bytes()),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split()
    )
    for needed in (
        "init",
        "bin/sh",
        "usr/sbin/dropbear",
        "usr/sbin/kexec",
        "etc/rc",
        "root/.ssh/authorized_keys",
        "lib64/ld-linux-x86-64.so.2",
        initramfs.HOST_KEY.lstrip("/"),
    ):
        assert needed in names
    assert keys.host_public().startswith("ssh-ed25519 ")
    assert initramfs.Keys(tmp_path / "keys").ensure().host_public() == keys.host_public()


# --- kernel identity -----------------------------------------------------------------------------


def test_image_version_and_identity_proof(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(fake_bzimage())
    k = kernel.load(str(image))
    assert (k.kernelrelease, k.utsversion) == (
        "7.2.13+",
        "#9 SMP PREEMPT Thu Jan  1 00:00:00 UTC 2026",
    )
    version = "Linux version 7.2.13+ (u@h) (gcc 12.2.0) #9 SMP PREEMPT Thu Jan  1 00:00:00 UTC 2026"
    before = boot.Identity("Linux version 7.2.13+ (u@h) (gcc) #8 SMP PREEMPT Wed", "id-1")
    assert boot.prove(k, before, boot.Identity(version, "id-2")) == []
    same_boot = boot.prove(k, before, boot.Identity(version, "id-1"))
    assert len(same_boot) == 1 and "never rebooted" in same_boot[0]
    other = boot.prove(k, before, boot.Identity(before.proc_version, "id-2"))
    assert len(other) == 1 and "not 7.2.13+ #9" in other[0]
    with pytest.raises(ToolkitError, match="not an x86 bzImage"):
        kernel.image_version(b"\0" * 0x1000)


def test_manifest_is_read_defensively(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(fake_bzimage())
    good = kernel.load(str(image))
    shapes = [
        {"bzimage": {"path": str(image), "sha256": good.sha256, "size": 1}, "tree": "/t"},
        {"bzimage": "bzImage", "sha256": good.sha256},  # relative, flat
    ]
    for shape in shapes:
        (tmp_path / "manifest.json").write_text(
            json.dumps(
                {**shape, "kernelrelease": "7.2.13+", "utsversion": good.utsversion, "extra": 1}
            )
        )
        loaded = kernel.load(str(tmp_path / "manifest.json"))
        assert loaded.sha256 == good.sha256 and loaded.manifest == tmp_path / "manifest.json"
    assert kernel.load(str(image)).manifest == tmp_path / "manifest.json"  # found next to it
    (tmp_path / "manifest.json").write_text(json.dumps({"bzimage": str(image), "sha256": "0" * 64}))
    with pytest.raises(ToolkitError, match="changed since"):
        kernel.load(str(tmp_path / "manifest.json"))
    (tmp_path / "manifest.json").write_text(json.dumps({"bzimage": str(image), "utsversion": "#1"}))
    with pytest.raises(ToolkitError, match="says utsversion"):
        kernel.load(str(tmp_path / "manifest.json"))
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "modules", "bzimage": None}))
    with pytest.raises(ToolkitError, match="names no bzImage"):
        kernel.load(str(tmp_path / "manifest.json"))


# --- dmesg -------------------------------------------------------------------------------------


def test_dmesg_scan_finds_splats_and_ignores_the_noiommu_taint() -> None:
    dmesg = "\n".join(
        [
            "[    1.0] kvm_amd: Nested Paging enabled",
            "[    2.0] vfio-pci 0000:00:03.0: Adding kernel taint for vfio-noiommu group on device",
            "[    3.0] WARNING: CPU: 0 PID: 75 at arch/x86/kvm/mmu/mmu.c:3534 direct_map+0x1/0x2",
            "[    3.1] Call Trace:",
            "[    4.0] BUG: kernel NULL pointer dereference, address: 0000000000000000",
            "[    5.0] Oops: 0000 [#1] PREEMPT SMP",
            "[    6.0] kvm: KVM_BUG_ON(...) hit",
        ]
    )
    hits = runner.scan_dmesg(dmesg)
    assert [h.line_number for h in hits] == [3, 4, 5, 6, 7]
    assert hits[0].context[0].endswith("Call Trace:")
    assert runner.scan_dmesg(dmesg, ignore=[r"direct_map"])[0].line_number == 4
    assert runner.scan_dmesg(dmesg.splitlines()[1]) == []


# --- grub ---------------------------------------------------------------------------------------

GRUB_CFG = """\
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-UUID' {
\tlinux\t/boot/vmlinuz-6.1.0-13-amd64 root=UUID=x ro quiet
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-UUID' {
\tmenuentry 'Debian GNU/Linux, with Linux 7.2.13+-kseries' --class debian $menuentry_id_option 'gnulinux-7.2.13+-kseries-advanced-UUID' {
\t\tif [ x$feature_all_video_module = xy ]; then
\t\t  insmod all_video
\t\tfi
\t\tlinux\t/boot/vmlinuz-7.2.13+-kseries root=UUID=x ro quiet
\t}
}
"""  # noqa: E501


def test_grub_entry_is_found_by_its_image() -> None:
    entry = boot.grub_entry(GRUB_CFG, "vmlinuz-7.2.13+-kseries")
    assert entry == "gnulinux-advanced-UUID>gnulinux-7.2.13+-kseries-advanced-UUID"
    assert boot.grub_entry(GRUB_CFG, "vmlinuz-6.1.0-13-amd64") == "gnulinux-simple-UUID"
    with pytest.raises(boot.BootError, match="no menu entry"):
        boot.grub_entry(GRUB_CFG, "vmlinuz-none")


# What Debian's update-grub writes with the toolkit's /etc/grub.d/45_kseries in place.
DEBIAN_CFG = """\
set default="${saved_entry}"
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-U' {
\tlinux\t/boot/vmlinuz-6.1.0-41-amd64 root=UUID=U ro console=ttyS0,115200
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-U' {
\tmenuentry 'Debian GNU/Linux, with Linux 6.1.0-41-amd64' $menuentry_id_option 'gnulinux-6.1.0-41-amd64-advanced-U' {
\t\tlinux\t/boot/vmlinuz-6.1.0-41-amd64 root=UUID=U ro console=ttyS0,115200
\t}
}
menuentry 'kseries test kernel 7.2.13+' $menuentry_id_option 'kseries-84aed8a77440' {
\tlinux\t/boot/kseries/vmlinuz-7.2.13+-84aed8a77440 root=PARTUUID=P-01 ro panic=10
}
"""  # noqa: E501
GOOD = "gnulinux-advanced-U>gnulinux-6.1.0-41-amd64-advanced-U"


def test_grub_fallback_needs_a_saved_known_good_entry() -> None:
    saved = f"GRUB_DEFAULT=saved\nsaved_entry={GOOD}\n"
    assert boot.grub_fallback(saved, DEBIAN_CFG) == GOOD
    assert boot.grub_entry(DEBIAN_CFG, "vmlinuz-7.2.13+-84aed8a77440") == "kseries-84aed8a77440"
    cases = {
        "GRUB_DEFAULT=0\n": "GRUB_DEFAULT=0: the box boots whichever entry",
        "GRUB_DEFAULT=saved\n": "has no saved_entry",
        "GRUB_DEFAULT=saved\nsaved_entry=gone\n": "'gone' is not in /boot/grub/grub.cfg",
        "GRUB_DEFAULT=saved\nsaved_entry=kseries-84aed8a77440\n": "is a kseries test kernel",
    }
    for settings, message in cases.items():
        with pytest.raises(boot.BoxNotReady, match=re.escape(message)) as refused:
            boot.grub_fallback(settings, DEBIAN_CFG)
        # the fix names a real, versioned known-good entry (never the test kernel's)
        assert f"grub-set-default '{GOOD}'" in refused.value.hint
        assert "GRUB_DEFAULT=saved" in refused.value.hint


def test_the_image_saves_a_versioned_debian_entry() -> None:
    from kseries.testbox import distro

    assert distro.known_good_entry(DEBIAN_CFG) == GOOD  # not the simple one, not kseries'


def test_grub_entry_script_is_valid_shell_with_its_settings() -> None:
    script = boot.GRUB_SCRIPT.read_text()
    assert script.count("set -e\n") == 1  # where boot() puts the KSERIES_* settings
    subprocess.run(["sh", "-n", str(boot.GRUB_SCRIPT)], check=True)


# --- reports -----------------------------------------------------------------------------------


def test_report_json_junit_and_table(tmp_path: Path) -> None:
    ident = {"proc_version": "Linux version 7.2.13+", "boot_id": "b"}
    base = report.Run("local", "ref base", {"kernelrelease": "7.2.13"}, after=ident)
    base.tests = [
        runner.TestResult("new_test", "fail", 1, 0.5, "out", "err", "exit 1: boom"),
        runner.TestResult("old_test", "pass", 0, 0.1),
    ]
    base.conclude()
    series = report.Run("local", "kernel", {"kernelrelease": "7.2.13+"}, after=ident)
    series.tests = [
        runner.TestResult("new_test", "pass", 0, 0.4),
        runner.TestResult("old_test", "skip", 4, 0.1, reason="no svm"),
    ]
    series.splats = runner.scan_dmesg("WARNING: at mmu.c")
    series.conclude()
    dead = report.Run(
        "box2",
        "kernel",
        {},
        verdict="boot failed",
        reason="no SSH after 5s",
        console_tail=["Kernel panic - not syncing: No working init found."],
    )
    runs = [base, series, dead]
    assert (base.verdict, series.verdict) == ("fail", "fail")
    assert not report.overall(runs)
    assert report.overall(
        [base, report.Run("local", "kernel", {}, verdict="pass")], reference_may_fail=True
    )
    json_path, junit_path = report.write(tmp_path, runs, {"kernel": {}})
    data = json.loads(json_path.read_text())
    assert [r["verdict"] for r in data["runs"]] == ["fail", "fail", "boot failed"]
    suites = ET.parse(junit_path).getroot().findall("testsuite")
    assert [s.get("failures") for s in suites] == ["1", "1", "1"]
    assert suites[1].get("skipped") == "1"
    assert suites[2].find("testcase/failure").get("message").startswith("boot failed")
    out = Console(width=120, record=True, color_system=None)
    out.print(report.table(runs))
    text = out.export_text()
    assert "ref base" in text and "FAIL" in text and "boot failed" in text
    lines = "\n".join(report.details(runs))
    assert "Kernel panic" in lines and "WARNING: at mmu.c" in lines


def test_commands_on_the_box_are_killed_at_their_timeout() -> None:
    spec = suite.TestSpec("t", binary="/x")
    line = runner.command_line(
        suite.Built(spec, b"x"), [], "/tmp/kseries/tests/t", 30, {"A": "b c"}
    )
    assert line.startswith("export A='b c'; setsid sh -c /tmp/kseries/tests/t & p=$!; ")
    assert "( sleep 30; kill -KILL -$p )" in line
    done = subprocess.run(
        [
            "sh",
            "-c",
            runner.command_line(
                suite.Built(suite.TestSpec("t", command="echo hi; sleep 30 & sleep 30")),
                [],
                "",
                1,
                {},
            ),
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert (done.returncode, done.stdout) == (137, "hi\n")  # the whole group, at once


# --- soak tests, summary lines, the merged soak report -------------------------------------


SOAK = """
[[test]]
name = "race"
binary = "/bin/true"
args = ["--bind", "--bdf", "{dev}"]
vars = { dev = "auto" }
timeout = 60
soak = { per_cycle = 0.5 }
metrics = ["cycles", "deaths", "mmu"]

[[test]]
name = "plain"
command = "true"
"""


def test_soak_options_grow_the_timeout_and_box_vars_fill_the_args(tmp_path: Path) -> None:
    known = suite.load_tests(TestboxConfig.load(configs(tmp_path, SOAK)))
    race, plain = known
    assert race.soaked(100).args[-2:] == ("--cycles", "100") and race.soaked(100).timeout == 110
    both = race.soaked(1000, 30)  # whichever ends first bounds the timeout
    assert both.args[-4:] == ("--cycles", "1000", "--duration", "30") and both.timeout == 90
    assert plain.soaked(100) is plain and race.soaked() is race
    assert race.argv({}, "box a") == ["--bind", "--bdf", "auto"]
    assert race.argv({"dev": "0000:03:00.0"}, "box a")[-1] == "0000:03:00.0"
    with pytest.raises(ToolkitError) as e:
        suite.TestSpec("t", binary="/x", args=("{bdf}",)).argv({}, "box lab1")
    assert e.value.message == "test t: no value for {bdf} in its args on box lab1"
    assert "vars = { bdf = ... }" in e.value.hint
    with pytest.raises(ToolkitError) as e:
        suite.soak([plain], 10, 0, known)
    assert "none of the selected tests is one" in e.value.message and "race" in e.value.hint
    with pytest.raises(ToolkitError):
        suite.soak([race], -1, 0, known)


def test_a_summary_line_decides_the_status_and_gives_metrics() -> None:
    out = (
        "vfio-bar-race: start\nvfio-bar-race: result=FAIL reason=vm-died-efault cycles=1 deaths=1\n"
    )
    assert runner.parse_summary(out) == (
        "fail",
        {"reason": "vm-died-efault", "cycles": "1", "deaths": "1"},
    )
    assert runner.judge(1, 0.1, 60, out, "") == ("fail", "vm-died-efault (exit 1)")
    skip = 'x: result=SKIP reason="no PCI device 0000:03:00.0"\n'
    assert runner.judge(4, 0.1, 60, skip, "") == ("skip", "no PCI device 0000:03:00.0 (exit 4)")
    assert runner.judge(0, 1, 60, "x: result=PASS cycles=200\n", "") == ("pass", "")
    assert runner.judge(3, 1, 60, "x: result=PASS\n", "")[0] == "fail"
    assert runner.judge(137, 60, 60, "x: result=PASS\n", "") == ("timeout", "killed after 60s")
    assert runner.judge(4, 0.1, 60, "no summary here\n", "") == ("skip", "no summary here")
    assert runner.judge(2, 0.1, 60, "", "boom\n") == ("fail", "exit 2: boom")


def test_soak_report_merges_boxes_per_kernel(tmp_path: Path) -> None:
    shown = ("cycles", "deaths", "mmu")
    runs = []
    for box, cycles, mmu in (("a", "300", "tdp_mmu"), ("b", "250", "shadow")):
        run = report.Run(box, "kernel", {}, after={"boot_id": box})
        run.tests = [
            runner.TestResult(
                "race",
                "pass",
                0,
                3.0,
                metrics={"cycles": cycles, "deaths": "0", "mmu": mmu},
                shown=shown,
            ),
            runner.TestResult("plain", "pass", 0, 0.1),
        ]
        runs.append(run)
    runs[1].splats = runner.scan_dmesg("BUG: soft lockup")
    rows = report.soak_rows(runs)["race"]
    assert [r["box"] for r in rows] == ["a", "b", "all boxes"]
    assert rows[2] | {} == {
        "box": "all boxes",
        "kernel": "kernel",
        "status": "2 pass",
        "cycles": 550,
        "deaths": 0,
        "mmu": "-",
        "dmesg": 1,
    }
    out = Console(width=140, record=True, color_system=None)
    for grid in report.soak_tables(runs):
        out.print(grid)
    text = out.export_text()
    assert "race: per box" in text and "550" in text and "all boxes" in text
    data = json.loads(report.write(tmp_path, runs, {})[0].read_text())
    assert data["soak_report"]["race"][2]["cycles"] == 550


def test_a_reference_column_is_named_after_its_build(tmp_path: Path) -> None:
    boot = tmp_path / "mst-base" / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    (boot / "manifest.json").write_text("{}")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "bzImage").write_bytes(b"")
    assert remote._ref_name(str(boot / "manifest.json")) == "mst-base"
    assert remote._ref_name(str(tmp_path / "kernels" / "bzImage")) == "kernels"
    assert remote._ref_name("kvm-x86/next") == "kvm-x86/next"


def test_group_runs_boxes_side_by_side_and_keeps_each_outcome() -> None:
    """Fabric's GroupResult shape: every box runs to its end, and one box's exception is that
    box's result, raised only once all have ended."""
    import threading
    from types import SimpleNamespace

    from kseries.errors import ToolkitError
    from kseries.testbox.group import Group

    boxes = [SimpleNamespace(name=n) for n in ("a", "b", "c")]
    together = threading.Barrier(3, timeout=10)  # only passes if all three run at once
    ended: list[str] = []

    def work(box: SimpleNamespace) -> str:
        together.wait()
        ended.append(box.name)
        if box.name == "b":
            raise ToolkitError("b is down")
        return box.name.upper()

    result = Group(boxes).run(work)  # type: ignore[arg-type]
    assert list(result) == ["a", "b", "c"]
    assert result.succeeded == {"a": "A", "c": "C"}
    assert str(result.failed["b"]) == "b is down"
    assert sorted(ended) == ["a", "b", "c"]
    with pytest.raises(ToolkitError, match="b is down"):
        result.values_or_raise()
    assert Group(boxes[:1]).run(lambda box: 1).values_or_raise() == [1]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("kernal", r"files\.f: 'kernal' names no source"),
        ("recipe:nope/x", r"files\.f: no \[recipe\.nope\]"),
        ("series:qemu@0", r"files\.f: series:qemu@0: @N is a number of patches"),
        ("series:", r"names no source"),
    ],
)
def test_a_bad_file_source_is_one_line(tmp_path: Path, source: str, message: str) -> None:
    text = f'[[test]]\nname = "t"\ncommand = "true"\nfiles = {{ f = "{source}" }}\n'
    with pytest.raises(ToolkitError, match=message) as caught:
        suite.load_tests(TestboxConfig.load(configs(tmp_path, text)))
    assert "testboxes.toml [[test]] #1 (t)" in str(caught.value)
    assert "\n" not in str(caught.value) and caught.value.hint


def test_file_sources_and_a_matrix_test_parse(tmp_path: Path) -> None:
    text = (
        '[recipe.cc]\ncommand = "true"\noutput = "{out}/x"\n'
        '[[test]]\nname = "pair"\nbinary = "/bin/true"\ncells = ["stock", "patched"]\n'
        'metrics = ["outcome", "toggles"]\n'
        'files = { k = "kernel", g = "recipe:cc/guest", q = "series:qemu@1", p = "series:qemu",'
        ' f = "file:fw.bin" }\n'
    )
    (spec,) = suite.load_tests(TestboxConfig.load(configs(tmp_path, text)))
    assert {n: (s.kind, s.value, s.target, s.patches) for n, s in spec.files.items()} == {
        "k": ("kernel", "", "", None),
        "g": ("recipe", "", "guest", None),
        "q": ("series", "qemu", "", 1),
        "p": ("series", "qemu", "", None),
        "f": ("file", str(tmp_path / "configs" / "fw.bin"), "", None),
    }
    assert spec.shown == ("stock_outcome", "stock_toggles", "patched_outcome", "patched_toggles")
    with pytest.raises(ToolkitError, match="a matrix needs metrics"):
        suite.load_tests(
            TestboxConfig.load(
                configs(tmp_path, '[[test]]\nname = "t"\ncommand = "true"\ncells = ["a"]\n')
            )
        )


def test_the_matrix_has_a_row_per_kernel_and_a_column_per_cell() -> None:
    shown = ("stock_outcome", "stock_toggles", "patched_outcome", "patched_toggles")
    runs = []
    for label, status, patched in (("ref base", "fail", "died"), ("kernel", "pass", "survived")):
        run = report.Run("viommu", label, {}, after={"boot_id": "x"})
        metrics = {"stock_outcome": "died", "stock_toggles": "1", "patched_outcome": patched}
        run.tests = [
            runner.TestResult(
                "pair", status, metrics=metrics, shown=shown, cells=("stock", "patched")
            )
        ]
        runs.append(run)
    assert report.soak_tables(runs) == []  # a matrix is shown as one, not as a soak table
    (grid,) = report.matrix_tables(runs)
    out = Console(width=120, record=True, color_system=None)
    out.print(grid)
    text = out.export_text()
    assert "pair on viommu" in text and "toggles 1" in text and "toggles -" in text
    lines = text.splitlines()
    base = next(i for i, line in enumerate(lines) if "ref base" in line)
    series = next(i for i, line in enumerate(lines) if "kernel" in line and i > base)
    assert "died" in lines[base] and "survived" in lines[series]


def test_a_matrix_test_killed_midway_keeps_its_finished_cells() -> None:
    """No summary line (L1 hung in the patched cell and the test was killed): the cells it
    finished still give their metrics; a summary line, when there is one, is what counts."""
    out = (
        'cell=stock outcome=died toggles=0 detail="kvm run failed Bad address"\n'
        "cell=handler outcome=died toggles=0\n"
        "vfio-bar-race-qemu: cell patched\n"
    )
    assert runner.metrics_of(out) == {
        "stock_outcome": "died",
        "stock_toggles": "0",
        "stock_detail": "kvm run failed Bad address",
        "handler_outcome": "died",
        "handler_toggles": "0",
    }
    assert runner.metrics_of(out + "x: result=FAIL stock_toggles=1\n") == {"stock_toggles": "1"}
