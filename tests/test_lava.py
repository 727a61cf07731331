"""Boot tests through a real LAVA lab: Debian's lava-server and lava-dispatcher (2023.01) with
one qemu device, started on this machine by ci/lava-setup.sh (stopped again at the end if this
module started it). Nothing is mocked.

- the series' selftest through LAVA: FAIL on the base (kvm-x86/next, built by --compare), PASS
  on the series, in LAVA columns beside the local QEMU box's (the done-when command's shape);
- a kernel that panics at boot: "boot failed" with the panic lines;
- a server that is down: "unreachable"; a token the server refuses: "error", and the token is
  in no file the run wrote;
- no device of the type online: "error", naming the devices it saw;
- an http artifact root: a web server on 127.0.0.1 serves the directory the toolkit writes
  the artifacts into, and the job fetches them from it;
- Ctrl-C (SIGINT) or SIGTERM on `invoke test-remote` cancels the job it follows.

Cold: about 3 minutes of LAVA setup, the series and base kernels (shared with
tests/test_vfio_bar_race.py's builds), then 20-60 s per LAVA job under TCG.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from kseries import build
from kseries.config import Config
from kseries.paths import PROJECT, cache_dir
from kseries.testbox import local, remote, report
from kseries.testbox.box import TestboxConfig
from kseries.testbox.lava import Client
from kseries.testbox.report import Run
from tests.conftest import INVOKE

pytestmark = pytest.mark.slow

SETUP = PROJECT / "ci" / "lava-setup.sh"
STATE = Path(os.environ.get("KSERIES_LAVA_DIR", "/var/tmp/kseries-lava"))
BAD_TOKEN = "kseries-test-not-a-token-0123456789"


@dataclass(frozen=True)
class Lab:
    config: Config
    url: str
    root: Path
    token: str  # the token file's path


def _setup(command: str) -> str:
    done = subprocess.run(
        ["bash", str(SETUP), command], capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (the OS picked it, then it was closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lava_box(
    url: str,
    token: str,
    *,
    extra: str = "",
    cmdline: str = "console=ttyS0,115200 panic=0",
    artifacts: str = f'url = "file://{STATE}/artifacts"',
) -> str:
    """A [box.NAME] body of kind lava, for configs/local.toml."""
    table = (
        f'{{ url = "{url}", device_type = "qemu"{extra}, token_file = "{token}", '
        f"artifacts = {{ {artifacts} }} }}"
    )
    return f'kind = "lava"\ncmdline = "{cmdline}"\ntimeouts = {{ boot = 240 }}\nlava = {table}\n'


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The lab up (started if it was not), and the project's configs with the lab's real URL
    and a few broken lava boxes, every local box's state under tmp."""
    was_running = "worker: running" in _setup("status")
    started = time.monotonic()
    print(_setup("start"))
    print(f"lava-setup start: {time.monotonic() - started:.0f}s")
    facts = dict(
        line.split("=", 1) for line in (STATE / "lava.env").read_text().splitlines() if "=" in line
    )
    url = facts["LAVA_URL"]
    root = tmp_path_factory.mktemp("lava")
    configs = root / "configs"
    shutil.copytree(PROJECT / "configs", configs, ignore=shutil.ignore_patterns("local.toml"))
    token = facts["LAVA_TOKEN_FILE"]

    def box(url: str, extra: str = "", cmdline: str = "console=ttyS0,115200 panic=0") -> str:
        return _lava_box(url, token, extra=extra, cmdline=cmdline)

    # init and rdinit name no program: "Requested init /no/init failed", a panic (panic=0: it
    # stays down, LAVA does not reboot it)
    panic = box(url, cmdline="console=ttyS0,115200 panic=0 rdinit=/no/init init=/no/init")
    down = box(f"http://127.0.0.1:{_closed_port()}")
    bad_token = box(url, extra=', token_env = "KSERIES_TEST_LAVA_TOKEN"')
    no_tag = box(url, extra=', tags = ["no-such-board"]')
    (configs / "local.toml").write_text(
        f'[box.lab-qemu.lava]\nurl = "{url}"\n'
        f'[box.local.qemu]\nstate_dir = "{root / "state" / "local"}"\n'
        f"[box.lab-panic]\n{panic}[box.lab-down]\n{down}"
        f"[box.lab-badtoken]\n{bad_token}[box.lab-notag]\n{no_tag}"
    )
    config = Config.load(configs)
    yield Lab(config, url, root, token)
    local.down(TestboxConfig.load(config).box("local"), log=lambda _: None)
    if not was_running:
        print(_setup("stop"))


@pytest.fixture(scope="module")
def kernel_a() -> Path:
    """A test-box kernel for the failure cases (tests/test_testbox_qemu.py's A, built once)."""
    from tests.test_testbox_qemu import build_test_kernels

    return build_test_kernels().a


@pytest.fixture(scope="module")
def series_manifest(lab: Lab, series_clone: Path) -> Path:
    """The series kernel, built by the build stage where tests/test_vfio_bar_race.py builds it."""
    out = cache_dir() / "ci-series" / "build" / "linux"
    made = build.build(lab.config, tree=str(series_clone), out=str(out), set_last=False)
    return Path(made.path)


def test_remote(lab: Lab, out: Path, **options: object) -> list[Run]:
    started = time.monotonic()
    runs, _ = remote.test_remote(lab.config, out=str(out), log=print, **options)  # type: ignore[arg-type]
    print("\n".join(report.details(runs)))
    print(f"test_remote {options.get('boxes')}: {time.monotonic() - started:.0f}s")
    return runs


test_remote.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def test_base_fails_and_the_series_passes_through_lava_beside_the_local_box(
    lab: Lab, series_manifest: Path, tmp_path: Path
) -> None:
    runs = test_remote(
        lab,
        tmp_path,
        boxes=["local", "lab-qemu"],
        kernel_spec=str(series_manifest),
        tests=["smoke", "memory_fault_exit_test"],
        compare="kvm-x86/next",
    )
    columns = {(r.box, r.label): r for r in runs}
    assert set(columns) == {
        (box, label) for box in ("local", "lab-qemu") for label in ("ref kvm-x86/next", "kernel")
    }
    for box in ("local", "lab-qemu"):
        base, series = columns[box, "ref kvm-x86/next"], columns[box, "kernel"]
        assert (base.verdict, series.verdict) == ("fail", "pass"), (base.reason, series.reason)
        statuses = {t.name: t.status for t in base.tests}
        assert statuses == {"smoke": "pass", "memory_fault_exit_test": "fail"}
        # The selftest's own words: "Wanted KVM exit reason: 39 (MEMORY_FAULT), got: 0 (UNKNOWN)".
        selftest = next(t for t in base.tests if t.name != "smoke")
        assert "(MEMORY_FAULT)" in selftest.stdout + selftest.stderr
    lava = columns["lab-qemu", "kernel"]
    # the identity proof, from the job's own test shell
    assert lava.after and lava.after["proc_version"].endswith(lava.kernel["utsversion"])
    assert lava.files["lava_job"].startswith(f"{lab.url}/scheduler/job/")
    assert Path(lava.files["console"]).read_text().count("KSERIES-PROC-VERSION") == 1
    junit = (tmp_path / "junit.xml").read_text()
    assert 'testsuite name="lab-qemu.kernel"' in junit and 'name="local.kernel"' in junit
    print(
        "LAVA job times (s):",
        [round(r.timings.get("lava_running", 0), 1) for r in runs if r.box == "lab-qemu"],
    )


def test_a_kernel_that_panics_is_boot_failed_with_the_panic_lines(
    lab: Lab, kernel_a: Path, tmp_path: Path
) -> None:
    (run,) = test_remote(
        lab, tmp_path, boxes=["lab-panic"], kernel_spec=str(kernel_a), tests=["smoke"]
    )
    assert run.verdict == "boot failed", run.reason
    assert run.reason.startswith("kernel panic: Kernel panic - not syncing")
    assert any("Kernel panic - not syncing" in line for line in run.console_tail)
    assert run.tests == [] and run.after is None


@contextmanager
def _web_server(root: Path, log: Path) -> Iterator[int]:
    """Python's http.server serving `root` on 127.0.0.1, on a port the OS picked (so it was
    free), its access log in `log`; stopped by its PID at the end."""
    command = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"]
    with log.open("w") as errors:
        server = subprocess.Popen(
            [*command, "--directory", str(root)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    try:
        assert server.stdout is not None
        first = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 40123 (http://...)"
        found = re.search(r" port (\d+) ", first)
        assert found, first + log.read_text()
        yield int(found.group(1))
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_artifacts_served_over_http_are_fetched_by_the_lab(
    lab: Lab, kernel_a: Path, tmp_path: Path
) -> None:
    """An http(s) artifact root, as a real lab's workers need: the toolkit writes the kernel,
    ramdisk and tests into the box's `dir`, a web server on 127.0.0.1 serves that directory
    under the box's `url`, and the job fetches all three from it."""
    www = tmp_path / "www"
    served = www / "kseries" / "artifacts"  # served at /kseries/artifacts: a url with a path
    access = tmp_path / "access.log"
    with _web_server(www, access) as port:
        url = f"http://127.0.0.1:{port}/kseries/artifacts"
        configs = tmp_path / "configs"
        shutil.copytree(lab.config.directory, configs)
        table = _lava_box(lab.url, lab.token, artifacts=f'url = "{url}/", dir = "{served}"')
        with (configs / "local.toml").open("a") as local_toml:
            local_toml.write(f"[box.lab-http]\n{table}")
        config = Config.load(configs)
        started = time.monotonic()
        runs, _ = remote.test_remote(
            config,
            boxes=["lab-http"],
            kernel_spec=str(kernel_a),
            tests=["smoke"],
            out=str(tmp_path / "out"),
            log=print,
        )
        print(f"test_remote lab-http: {time.monotonic() - started:.0f}s")
    (run,) = runs
    assert run.verdict == "pass", run.reason
    assert run.after and run.after["proc_version"].endswith(run.kernel["utsversion"])
    published = sorted(p.name for p in served.iterdir())
    assert len(published) == 3 and {n.split("-", 1)[1] for n in published} == {
        "bzImage",
        "ramdisk.cpio.gz",
        "kseries-tests.tar",
    }
    job = (tmp_path / "out" / "lab-http" / "kernel" / "job.yaml").read_text()
    fetched = access.read_text()
    print(fetched)
    for name in published:
        assert f"{url}/{name}" in job  # the job names the http URL, not a file
        assert re.search(rf'"GET /kseries/artifacts/{re.escape(name)} HTTP/1\.[01]" 200 ', fetched)


def test_a_server_that_is_down_is_unreachable(lab: Lab, kernel_a: Path, tmp_path: Path) -> None:
    (run,) = test_remote(
        lab, tmp_path, boxes=["lab-down"], kernel_spec=str(kernel_a), tests=["smoke"]
    )
    assert run.verdict == "unreachable"
    assert "is unreachable" in run.reason and "Connection refused" in run.reason
    assert run.tests == []


def test_a_refused_token_is_named_and_never_written(
    lab: Lab, kernel_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KSERIES_TEST_LAVA_TOKEN", BAD_TOKEN)
    (run,) = test_remote(
        lab, tmp_path, boxes=["lab-badtoken"], kernel_spec=str(kernel_a), tests=["smoke"]
    )
    assert run.verdict == "error"
    assert "refused the token (403: Invalid token.)" in run.reason
    assert "KSERIES_TEST_LAVA_TOKEN" in run.reason
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert BAD_TOKEN not in path.read_text(errors="replace"), path


def test_no_device_online_names_what_the_lab_has(lab: Lab, kernel_a: Path, tmp_path: Path) -> None:
    (run,) = test_remote(
        lab, tmp_path, boxes=["lab-notag"], kernel_spec=str(kernel_a), tests=["smoke"]
    )
    assert run.verdict == "error"
    assert run.reason.startswith("no qemu with tags no-such-board device online"), run.reason


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_cancels_the_job(
    lab: Lab, kernel_a: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGINT, as a terminal's Ctrl-C sends it, or SIGTERM, as a CI job's timeout or `kill`
    does, once the job runs: the job ends Canceled."""
    env = {**os.environ, "KSERIES_CONFIG_DIR": str(lab.config.directory)}
    command = [INVOKE, "-r", str(PROJECT), "test-remote", "--box", "lab-qemu"]
    command += ["--kernel", str(kernel_a), "--tests", "smoke", "--out", str(tmp_path / "out")]
    child = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    job_id, lines = 0, []
    for line in child.stdout:
        lines.append(line)
        found = re.search(r"job (\d+) submitted", line)
        job_id = int(found.group(1)) if found else job_id
        if job_id and f"job {job_id}: Running" in line:
            child.send_signal(signum)
            break
    rest = child.communicate(timeout=120)[0]
    print("".join(lines) + rest)
    assert child.returncode != 0 and f"interrupted: canceled job {job_id}" in rest
    client = Client(TestboxConfig.load(lab.config).box("lab-qemu").lava)  # type: ignore[arg-type]
    for _ in range(60):
        job = client.job(job_id)
        if job["state"] == "Finished":
            break
        time.sleep(1)
    assert (job["state"], job["health"]) == ("Finished", "Canceled")
