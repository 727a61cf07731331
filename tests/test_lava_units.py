"""The lava box kind's pure parts: its settings, the job it renders, reading a job's log and
LAVA's results back. Fast; no lab (tests/test_lava.py runs the real one)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.paths import PROJECT
from kseries.testbox import kernel, lavajob, remote, suite
from kseries.testbox.box import TestboxConfig, parse_box
from kseries.testbox.lava import TokenRefused
from kseries.testbox.report import Run

NONE = ("", "")  # LAVA recorded no error for the job
LAVA = {
    "url": "http://127.0.0.1:8787/",
    "device_type": "qemu",
    "token_env": "KSERIES_UNIT_LAVA_TOKEN",
    "artifacts": {"url": "file:///var/tmp/kseries-lava/artifacts"},
}


def lava_box(tmp_path: Path, **lava: object) -> object:
    return parse_box("lab", {"kind": "lava", "lava": {**LAVA, **lava}}, tmp_path, "[box.lab]")


def test_the_project_lab_box_parses() -> None:
    box = TestboxConfig.load(Config.load(PROJECT / "configs")).box("lab-qemu")
    assert box.method == "lava" and box.lava is not None and box.qemu is None
    assert box.lava.url == "http://127.0.0.1:8787" and box.lava.device_type == "qemu"
    assert box.lava.artifact_dir == Path("/var/tmp/kseries-lava/artifacts")
    assert "panic=0" in box.cmdline.split()  # panic=-1 under LAVA: a reboot loop
    assert "-cpu max" in box.lava.context["extra_options"]


def test_lava_box_errors_name_the_table_and_key(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match=r"\[box.lab.lava\]: unknown setting devicetype"):
        lava_box(tmp_path, devicetype="qemu")
    with pytest.raises(ToolkitError, match="host is not a setting of a lava box"):
        parse_box("lab", {"kind": "lava", "host": "x", "lava": LAVA}, tmp_path, "[box.lab]")
    with pytest.raises(ToolkitError, match="kind 'lab' is not one of ssh, lava"):
        parse_box("lab", {"kind": "lab"}, tmp_path, "[box.lab]")
    with pytest.raises(ToolkitError, match="url 'ftp://x' is not http"):
        lava_box(tmp_path, url="ftp://x")
    with pytest.raises(ToolkitError, match=r"an http\(s\) url needs dir"):
        lava_box(tmp_path, artifacts={"url": "https://lab.example.org/kseries"})
    with pytest.raises(ToolkitError, match="needs token_env or token_file"):
        lava_box(tmp_path, token_env="")
    with pytest.raises(ToolkitError, match="memory must be an integer"):
        lava_box(tmp_path, context={"memory": "3G"})


def test_a_token_file_in_the_repository_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match="inside the project, where it would be committed"):
        lava_box(PROJECT / "configs", token_file="lava-token")


def test_the_token_comes_from_the_environment_then_the_file_and_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-the-file\n")
    box = lava_box(tmp_path, token_file=str(secret))
    monkeypatch.setenv("KSERIES_UNIT_LAVA_TOKEN", "from-the-env")
    assert box.lava.token() == "from-the-env"
    monkeypatch.delenv("KSERIES_UNIT_LAVA_TOKEN")
    assert box.lava.token() == "from-the-file"
    with pytest.raises(TokenRefused, match=r"no LAVA token: \$KSERIES_UNIT_LAVA_TOKEN is not set"):
        lava_box(tmp_path).lava.token()
    assert "from-the" not in repr(box)


def _kernel(tmp_path: Path) -> kernel.Kernel:
    uts = "#1 SMP PREEMPT Thu Jan  1 00:00:00 UTC 2026"
    return kernel.Kernel(tmp_path / "bzImage", b"x", "0" * 64, "7.2.13+", uts)


def test_the_job_and_its_test_shell_render(tmp_path: Path) -> None:
    box = lava_box(tmp_path, tags=["rack-1"], context={"memory": 3072})
    session = lavajob.LavaSession(box, log=lambda _: None)
    spec = suite.TestSpec(name="vm's test", command="echo 'hi there'", timeout=30)
    program = suite.TestSpec(name="prog", binary="/bin/true", timeout=20)
    built = [suite.Built(spec), suite.Built(program, data=b"\x7fELF")]
    definition = session._definition(
        "ref kvm-x86/next",
        _kernel(tmp_path),
        built,
        {"kernel": "file:///k", "ramdisk": "file:///r", "tests": "file:///t"},
    )
    assert "format: cpio.newc" in definition and "lava: true" in definition
    assert '"rack-1"' in definition and "memory: 3072" in definition
    python = shutil.which("python3", path="/usr/bin")
    if python and subprocess.run([python, "-c", "import yaml"], check=False).returncode == 0:
        # PyYAML (a LAVA dependency, Debian's python3-yaml) reads it as LAVA will
        done = subprocess.run(
            [python, "-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
            input=definition,
            capture_output=True,
            text=True,
            check=True,
        )
        job = json.loads(done.stdout)
        kernel_image = job["actions"][0]["deploy"]["images"]["kernel"]
        assert kernel_image["image_arg"].startswith('-kernel {kernel} -append "console=ttyS0')
        assert job["tags"] == ["rack-1"] and job["context"]["no_kvm"] is True
        assert job["timeouts"]["job"]["seconds"] > 30 + 20
    tar, early = session._script(built)
    assert early == {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        names = archive.getnames()
        script = archive.extractfile("run.sh").read().decode()
    assert names[0] == "run.sh" and any(n.startswith("tests/prog-") for n in names)
    assert "kseries_test 'vm'\"'\"'s test'" in script  # quoted for the box's shell
    assert "/kseries/tests/prog-" in script


LOG = "\n".join(
    "- " + json.dumps({"dt": f"2026-12-01T23:30:{second:02d}.000000", "lvl": level, "msg": msg})
    for second, level, msg in [
        (0, "info", "start: 0 validate"),
        (2, "info", "start: 2 boot-qemu-image (timeout 00:04:00) [common]"),
        (9, "target", "[    0.000000] Linux version 7.2.13+ (u@h) ..."),
        (
            20,
            "target",
            "KSERIES-PROC-VERSION: Linux version 7.2.13+ (u@h) "
            "#1 SMP PREEMPT Thu Jan  1 00:00:00 UTC 2026",
        ),
        (20, "target", "KSERIES-BOOT-ID: 1234abcd-0000"),
        (20, "target", "KSERIES-TEST-BEGIN smoke"),
        (21, "target", "KSERIES-OUT| hello"),
        (21, "target", "[   12.1] a kernel line in between"),
        (21, "target", "KSERIES-ERR| oops on stderr"),
        (21, "target", "KSERIES-TEST-END smoke exit=1 start=20.00 end=21.50"),
        (22, "target", "KSERIES-DMESG-BEGIN"),
        (22, "target", "KSERIES-DMESG| [    1.0] WARNING: CPU: 0 PID: 1 at mm/x.c:1"),
        (22, "target", "KSERIES-DMESG-END"),
        (23, "results", {"case": "job", "definition": "lava", "result": "pass"}),
    ]
)


def test_the_log_is_read_back_into_the_same_run(tmp_path: Path) -> None:
    parsed = lavajob.parse_log(LOG)
    assert parsed.boot_id == "1234abcd-0000" and parsed.proc_version.endswith("2026")
    assert parsed.tests["smoke"]["stdout"] == ["hello"]  # the kernel's line is not the test's
    box = lava_box(tmp_path)
    session = lavajob.LavaSession(box, log=lambda _: None)
    k = _kernel(tmp_path)
    record = Run("lab", "kernel", k.to_json())
    spec = suite.TestSpec(name="smoke", command="true", timeout=30)
    job = {"id": 7, "health": "Complete"}
    session._judge(record, k, [suite.Built(spec)], {}, parsed, job, ("", ""), tmp_path)
    assert record.after == {"proc_version": parsed.proc_version, "boot_id": "1234abcd-0000"}
    (smoke,) = record.tests
    assert (smoke.status, smoke.exit_status, smoke.stderr) == ("fail", 1, "oops on stderr")
    assert abs(smoke.duration - 1.5) < 1e-6
    assert record.verdict == "fail" and len(record.splats) == 1
    assert record.timings["boot"] == 18.0  # boot action start to the identity line
    assert (tmp_path / "tests" / "smoke.out").read_text().startswith("# fail exit=1 1.50s")


def test_a_panic_at_boot_is_boot_failed_and_a_lab_failure_is_not_a_test_result(
    tmp_path: Path,
) -> None:
    session = lavajob.LavaSession(lava_box(tmp_path), log=lambda _: None)
    k = _kernel(tmp_path)
    panic = lavajob.parse_log(
        "\n".join(
            "- " + json.dumps({"dt": "2026-12-01T23:30:00.0", "lvl": "target", "msg": m})
            for m in ["[ 1.2] Run /no/init as init process", "Kernel panic - not syncing: No init"]
        )
    )
    record = Run("lab", "kernel", k.to_json())
    session._judge(record, k, [], {}, panic, {"id": 1, "health": "Incomplete"}, NONE, tmp_path)
    assert record.verdict == "boot failed"
    assert record.reason == "kernel panic: Kernel panic - not syncing: No init"
    assert record.console_tail[-1].startswith("Kernel panic")
    # as the results API gives them: suite is an id, metadata is YAML text
    results = [
        {
            "suite": 7,
            "name": "job",
            "result": "fail",
            "metadata": "case: job\n"
            "definition: lava\nerror_msg: no qemu\nerror_type: Infrastructure\nresult: fail\n",
        },
    ]
    ours = {"suite": 8, "name": "job", "result": "fail", "metadata": "definition: 0_kseries\n"}
    assert lavajob.lava_error([ours]) == ("", "")
    infra = lavajob.lava_error(results)
    assert infra == ("Infrastructure", "no qemu")
    record = Run("lab", "kernel", k.to_json())
    empty = lavajob.parse_log("")
    session._judge(record, k, [], {}, empty, {"id": 2, "health": "Incomplete"}, infra, tmp_path)
    assert record.verdict == "infra error" and "not a test result" in record.reason
    # a missing artifact, as LAVA 2023.01 words it: the job, not the kernel and not the lab
    missing = "case: job\ndefinition: lava\nerror_msg: 'Invalid job data: [\"Image file ''/a/b''\n  does not exist or is not readable\"]\n\n  '\nerror_type: Job\nresult: fail\n"  # noqa: E501
    refused = lavajob.lava_error([{"name": "job", "result": "fail", "metadata": missing}])
    assert refused == (
        "Job",
        "Invalid job data: [\"Image file '/a/b' does not exist or is not readable\"]",
    )
    record = Run("lab", "kernel", k.to_json())
    session._judge(record, k, [], {}, empty, {"id": 3, "health": "Incomplete"}, refused, tmp_path)
    assert record.verdict == "error" and record.reason.startswith("LAVA refused the job: job 3")


def test_the_box_ramdisk_has_a_console_shell_for_lava() -> None:
    assert lavajob.INITTAB.startswith("::sysinit:/etc/rc\n")
    assert f"PS1={lavajob.PROMPT}" in lavajob.INITTAB and "dropbear" not in lavajob.INITTAB


def test_trace_on_a_lava_box_is_refused_before_any_build(tmp_path: Path) -> None:
    """--trace needs tracefs over SSH; a LAVA column without its counts would read as traced."""
    from kseries.config import Config

    with pytest.raises(ToolkitError, match="--trace: lab-qemu is a LAVA lab box"):
        remote.test_remote(
            Config.load(), boxes=["lab-qemu"], trace=True, out=str(tmp_path / "o"), log=print
        )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_sigterm_cancels_the_followed_job_as_ctrl_c_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (a CI timeout, `kill PID`) mid-job: the job is canceled, the run ends as an
    interrupt, and the signal's previous handler is back. The lab is a stand-in for LAVA's
    REST API on 127.0.0.1 (a job that runs until canceled): the real lab is tests/test_lava.py's."""
    import http.server
    import os
    import signal
    import threading

    from kseries import ui

    asked: list[str] = []

    class Lab(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = json.dumps({"id": 7, "state": "Running", "actual_device": "qemu-01"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Lab)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lines: list[str] = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        box = lava_box(tmp_path, url=url)
        follower = lavajob.LavaSession(box, log=lines.append)
        k = _kernel(tmp_path)
        before = signal.getsignal(signal.SIGTERM)
        monkeypatch.setenv("KSERIES_UNIT_LAVA_TOKEN", "unit-token")
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        with pytest.raises(KeyboardInterrupt), ui.terminate_as_interrupt():
            follower._follow(7, "kernel", Run("lab", "kernel", k.to_json()))
        timer.join()
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        server.shutdown()
        server.server_close()
    assert "/api/v0.2/jobs/7/" in asked and asked[-1] == "/api/v0.2/jobs/7/cancel/"
    assert lines[-1] == "lab: kernel: interrupted: canceled job 7"
