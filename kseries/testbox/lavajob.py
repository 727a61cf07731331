"""One kernel on a lava box: a LAVA job rendered, submitted, followed and read back into the
same `Run` the SSH boxes fill (kseries/testbox/report.py), so the verdict table, report.json
and junit.xml do not care which kind of box a column came from.

1. Check the lab: the server answers, takes the token, and has a device of the type (and
   tags) on an online worker. Each failure is a verdict of its own ("unreachable", "error").
2. Publish the artifacts where the lab reads them (`[box.NAME.lava] artifacts`): the bzImage,
   the box's ramdisk (the local box's busybox userspace with a shell on the console instead of
   sshd) and a tar of the test programs plus the job's test shell, templates/lava/run.sh.j2.
   Files are named by their sha256, so two runs never see each other's half-written files.
3. Render templates/lava/job.yaml.j2 and submit it; print a line per state change; Ctrl-C
   cancels the job.
4. Read the log and LAVA's own results back. The test shell prints /proc/version and the
   boot_id, which are checked against the build exactly as on an SSH box; then each test's
   output, exit status and times, then dmesg, which is scanned for splats as usual.

A kernel panic is "boot failed" with the panic lines (test kernels boot with panic=0 under
LAVA, so the job does not turn into a reboot loop); a job LAVA ends with an infrastructure
error is "infra error", never a test failure.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from kseries.core.files import write_atomic
from kseries.errors import ToolkitError
from kseries.paths import PROJECT, lava_dir
from kseries.testbox import boot, initramfs, suite
from kseries.testbox.box import Box
from kseries.testbox.kernel import Kernel
from kseries.testbox.lava import Client, LavaError, LavaSettings
from kseries.testbox.machine import last_lines
from kseries.testbox.qemu import host_tsc_khz
from kseries.testbox.report import Run
from kseries.testbox.runner import (
    TestResult,
    command_line,
    judge,
    metrics_of,
    save_outputs,
    scan_dmesg,
)

Log = Callable[[str], None]
TEMPLATES = PROJECT / "templates" / "lava"
WORKDIR = "/kseries"  # where the tests tar lands in the box
PROMPT = "kseries-lava%"
# The box's userspace under LAVA: the local box's mounts and network, then a shell on the
# console with a prompt LAVA waits for (busybox init runs it without a shell: no quoting).
INITTAB = f"::sysinit:/etc/rc\n::respawn:/usr/bin/env PS1={PROMPT} HOME=/root /bin/sh -i\n"
DEFAULT_CMDLINE = "console=ttyS0,115200 panic=0"
PANIC = re.compile(r"Kernel panic - not syncing")

# Jobs being followed, so an interrupt anywhere (with --boxes they run in threads) cancels them.
_ACTIVE: dict[int, Client] = {}
_ACTIVE_LOCK = threading.Lock()


def cancel_all(log: Log) -> None:
    """Cancel every job this process is following (Ctrl-C)."""
    with _ACTIVE_LOCK:
        active = dict(_ACTIVE)
    for job_id, client in active.items():
        try:
            client.cancel(job_id)
            log(f"lava: canceled job {job_id} ({client.job_url(job_id)})")
        except ToolkitError as e:
            log(f"lava: could not cancel job {job_id}: {e}")


@dataclass
class Parsed:
    """What the job's log said, line by line (console lines are LAVA's "target" level)."""

    console: list[str] = field(default_factory=list)
    proc_version: str = ""
    boot_id: str = ""
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    dmesg: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # LAVA's own error lines
    times: dict[str, float] = field(default_factory=dict)  # seconds from the log's start


def parse_log(text: str) -> Parsed:
    """LAVA's job log: a YAML list of one-line flow mappings ({"dt": ..., "lvl": ...,
    "msg": ...}), each of which is also JSON."""
    parsed = Parsed()
    current: dict[str, Any] | None = None
    start: float | None = None
    for raw in text.splitlines():
        line = raw[2:] if raw.startswith("- ") else raw
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        stamp = _seconds(entry.get("dt", ""))
        if start is None and stamp is not None:
            start = stamp
        at = stamp - start if stamp is not None and start is not None else 0.0
        level, msg = entry.get("lvl"), entry.get("msg")
        if level in ("error", "exception") and isinstance(msg, str):
            parsed.errors.append(msg)
        if level == "info" and isinstance(msg, str) and msg.startswith("start: 2 "):
            parsed.times.setdefault("boot_start", at)
        if level != "target" or not isinstance(msg, str):
            continue
        msg = msg.replace("\r", "")
        parsed.console.append(msg)
        if msg.startswith("KSERIES-PROC-VERSION: "):
            parsed.proc_version = msg.split(": ", 1)[1].strip()
            parsed.times.setdefault("identity", at)
        elif msg.startswith("KSERIES-BOOT-ID: "):
            parsed.boot_id = msg.split(": ", 1)[1].strip()
        elif msg.startswith("KSERIES-TEST-BEGIN "):
            current = {"stdout": [], "stderr": []}
            parsed.tests[msg.split(" ", 1)[1].strip()] = current
        elif msg.startswith("KSERIES-OUT| ") and current is not None:
            current["stdout"].append(msg[len("KSERIES-OUT| ") :])
        elif msg.startswith("KSERIES-ERR| ") and current is not None:
            current["stderr"].append(msg[len("KSERIES-ERR| ") :])
        elif msg.startswith("KSERIES-TEST-END ") and current is not None:
            fields = dict(w.split("=", 1) for w in msg.split()[2:] if "=" in w)
            current.update(fields)
            current = None
        elif msg.startswith("KSERIES-DMESG| "):
            parsed.dmesg.append(msg[len("KSERIES-DMESG| ") :])
        elif msg.startswith("KSERIES-DMESG-END"):
            parsed.times.setdefault("tests_end", at)
    parsed.times["end"] = at if start is not None else 0.0
    return parsed


def _seconds(dt: str) -> float | None:
    """LAVA's "2026-12-01T23:40:01.123456" as seconds (only differences are used)."""
    match = re.match(r"\d{4}-\d\d-\d\dT(\d\d):(\d\d):(\d\d(?:\.\d+)?)", dt)
    if not match:
        return None
    h, m, s = match.groups()
    return int(h) * 3600 + int(m) * 60 + float(s)


INFRASTRUCTURE = ("Infrastructure", "Bug", "Configuration")  # the lab failed, not the kernel


def lava_error(results: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """LAVA's own verdict on a failed job (case "job" of its "lava" definition): the error
    type (Infrastructure, Job, LAVATimeout, ...) and message; empty when it recorded none."""
    for case in results:
        if case.get("name") != "job" or case.get("result") != "fail":
            continue
        meta = case.get("metadata") or {}
        if isinstance(meta, str):
            meta = _metadata(meta)
        if meta.get("definition") != "lava":  # a test case of ours that happens to be "job"
            continue
        return meta.get("error_type", ""), meta.get("error_msg", "")
    return "", ""


def _metadata(text: str) -> dict[str, str]:
    """The results API gives a case's metadata as YAML text: its `key: value` lines, a value
    folded over indented lines joined again, YAML's quotes taken off."""
    out: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if key and (line.startswith(" ") or not line.strip()):
            out[key] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
        key = key.strip() if sep else ""
    for name, value in out.items():
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1].replace("''", "'") if value[0] == "'" else value[1:-1]
        out[name] = value.strip()
    return out


class Artifacts:
    """The files a job downloads, published under the lab's artifact directory by sha256."""

    def __init__(self, settings: LavaSettings) -> None:
        assert settings.artifact_dir is not None
        self.dir = settings.artifact_dir
        self.url = settings.artifact_url

    def publish(self, name: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.dir / f"{sha[:16]}-{name}"
        if not path.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data, mode=0o644)
        return f"{self.url}/{path.name}"


def ramdisk() -> bytes:
    """The box's userspace for LAVA (built once, then reused: kseries/testbox/initramfs.py)."""
    home = lava_dir()
    keys = initramfs.Keys(home / "keys")
    return initramfs.build(home / "ramdisk.cpio.gz", keys, inittab=INITTAB).read_bytes()


def tests_tar(script: str, programs: dict[str, bytes]) -> bytes:
    """run.sh and the test programs at their box paths (relative to WORKDIR), reproducibly."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, mode in (
            ("run.sh", script.encode(), 0o755),
            *((p, d, 0o755) for p, d in sorted(programs.items())),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["shell"] = shlex.quote
    return env


class LavaSession:
    """A lava box, driven through one or more kernels in turn (BoxSession's counterpart)."""

    def __init__(self, box: Box, *, dmesg_ignore: Sequence[str] = (), log: Log = print) -> None:
        assert box.lava is not None
        self.box = box
        self.settings: LavaSettings = box.lava
        self.client = Client(box.lava)
        self.log = lambda m: log(f"{box.name}: {m}")
        self.dmesg_ignore = tuple(dmesg_ignore)
        self.artifacts = Artifacts(box.lava)
        self.templates = _environment()

    def cmdline(self) -> str:
        cmdline = self.box.cmdline or DEFAULT_CMDLINE
        khz = self.settings.tsc_khz if self.settings.tsc_khz >= 0 else host_tsc_khz()
        if khz > 0 and "tsc_early_khz=" not in cmdline:
            cmdline += f" tsc_early_khz={khz}"  # see QemuBox.kernel_cmdline: TCG, no ACPI
        return cmdline

    def run(self, subject: Any, tests: Sequence[suite.Built], directory: Path) -> Run:
        directory.mkdir(parents=True, exist_ok=True)
        k: Kernel = subject.kernel
        record = Run(self.box.name, subject.label, k.to_json(), directory=directory)
        started = time.monotonic()
        try:
            self._run(record, subject.label, k, tests, directory)
        except LavaError as e:
            record.verdict, record.reason = e.verdict, str(e)
        except ToolkitError as e:
            record.verdict, record.reason = "error", str(e)
        finally:
            record.timings["total"] = time.monotonic() - started
            record.save(directory)
        self.log(record.outcome)
        return record

    def _run(
        self,
        record: Run,
        label: str,
        kernel: Kernel,
        tests: Sequence[suite.Built],
        directory: Path,
    ) -> None:
        t = time.monotonic()
        user = self.client.whoami()
        devices = self.client.check_online()
        record.timings["reach"] = time.monotonic() - t
        self.log(f"{label}: LAVA {self.settings.url} as {user}; devices online: {devices}")
        ready, early = self._script([built.with_kernel(kernel.data) for built in tests])
        t = time.monotonic()
        urls = {
            "kernel": self.artifacts.publish("bzImage", kernel.data),
            "ramdisk": self.artifacts.publish("ramdisk.cpio.gz", ramdisk()),
            "tests": self.artifacts.publish("kseries-tests.tar", ready),
        }
        record.timings["artifacts"] = time.monotonic() - t
        definition = self._definition(label, kernel, tests, urls)
        (directory / "job.yaml").write_text(definition)
        job_id = self.client.submit(definition)
        record.files["lava_job"] = self.client.job_url(job_id)
        self.log(f"{label}: job {job_id} submitted: {self.client.job_url(job_id)}")
        job = self._follow(job_id, label, record)
        text = self.client.log(job_id)
        (directory / "lava-log.yaml").write_text(text)
        parsed = parse_log(text)
        (directory / "console.log").write_text("\n".join(parsed.console) + "\n")
        record.files["console"] = str(directory / "console.log")
        record.files["lava_log"] = str(directory / "lava-log.yaml")
        error = ("", "") if job.get("health") == "Complete" else self._lava_error(job_id)
        self._judge(record, kernel, tests, early, parsed, job, error, directory)

    def _script(self, tests: Sequence[suite.Built]) -> tuple[bytes, dict[str, TestResult]]:
        """The tests tar (run.sh + programs); tests that cannot run are judged already."""
        early: dict[str, TestResult] = {}
        lines, programs = [], {}
        for built in tests:
            spec = built.spec
            if built.error:
                early[spec.name] = TestResult(spec.name, "error", reason=built.error)
                continue
            try:
                argv = spec.argv(self.box.vars, f"box {self.box.name}", built.file_paths(WORKDIR))
            except ToolkitError as e:
                early[spec.name] = TestResult(spec.name, "error", reason=str(e))
                continue
            path = built.program_path(WORKDIR)
            uploads = built.uploads(WORKDIR).items()
            programs |= {p[len(WORKDIR) + 1 :]: data for p, (data, _) in uploads}
            env = {"KSERIES_BOX": self.box.name, **self.box.env}
            timeout = spec.timeout or self.box.timeouts.test
            lines.append({"name": spec.name, "line": command_line(built, argv, path, timeout, env)})
        script = self.templates.get_template("run.sh.j2").render(
            tests=lines, skip_exit=suite.SKIP_EXIT
        )
        return tests_tar(script, programs), early

    def _definition(
        self, label: str, kernel: Kernel, tests: Sequence[suite.Built], urls: dict[str, str]
    ) -> str:
        box = self.box
        tests_s = sum(int(b.spec.timeout or box.timeouts.test) for b in tests) + 120
        timeouts = {"deploy": 300, "boot": int(box.timeouts.boot), "tests": tests_s}
        timeouts["job"] = sum(timeouts.values()) + 120
        return self.templates.get_template("job.yaml.j2").render(
            lava=self.settings,
            box=box.name,
            label=label,
            kernel=kernel,
            cmdline=self.cmdline(),
            artifacts=urls,
            timeouts=timeouts,
            prompt=PROMPT,
        )

    def _follow(self, job_id: int, label: str, record: Run) -> dict[str, Any]:
        """Poll the job until it finishes, a line per state change; Ctrl-C cancels it."""
        with _ACTIVE_LOCK:
            _ACTIVE[job_id] = self.client
        seen, since = "", time.monotonic()
        try:
            while True:
                job = self.client.job(job_id)
                state = job.get("state", "?")
                if state != seen:
                    now = time.monotonic()
                    if seen:
                        record.timings[f"lava_{seen.lower()}"] = now - since
                    where = f" on {job['actual_device']}" if job.get("actual_device") else ""
                    health = f" ({job.get('health')})" if state == "Finished" else ""
                    self.log(f"{label}: job {job_id}: {state}{where}{health}")
                    seen, since = state, now
                if state == "Finished":
                    return job
                time.sleep(self.settings.poll)
        except KeyboardInterrupt:
            try:
                self.client.cancel(job_id)
                self.log(f"{label}: interrupted: canceled job {job_id}")
            except ToolkitError as e:  # the interrupt still wins: it is what the user asked
                self.log(f"{label}: interrupted; canceling job {job_id} failed: {e}")
            raise
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.pop(job_id, None)

    def _lava_error(self, job_id: int) -> tuple[str, str]:
        try:
            return lava_error(self.client.results(job_id))
        except LavaError:
            return "", ""

    def _judge(
        self,
        record: Run,
        kernel: Kernel,
        tests: Sequence[suite.Built],
        early: dict[str, TestResult],
        parsed: Parsed,
        job: dict[str, Any],
        error: tuple[str, str],
        directory: Path,
    ) -> None:
        times = parsed.times
        if "identity" in times:
            record.timings["boot"] = times["identity"] - times.get("boot_start", 0.0)
        panic = [i for i, line in enumerate(parsed.console) if PANIC.search(line)]
        health = job.get("health", "?")
        kind, message = error
        ended = f"job {job.get('id')} {health}" + (f": {kind}: {message}" if kind else "")
        if panic and not parsed.proc_version:
            first = panic[0]
            record.verdict = "boot failed"
            record.reason = f"kernel panic: {parsed.console[first].strip()}"
            record.console_tail = last_lines("\n".join(parsed.console[: first + 1]), 25)
            return
        if not parsed.proc_version:
            if kind in INFRASTRUCTURE:
                record.verdict = "infra error"
                record.reason = f"LAVA infrastructure error, not a test result: {ended}"
            elif kind == "Job":  # LAVA refused what it was given (an artifact, the job)
                record.verdict, record.reason = "error", f"LAVA refused the job: {ended}"
            elif health == "Canceled":
                record.verdict, record.reason = "error", f"{ended} (canceled)"
            else:
                record.verdict = "boot failed"
                record.reason = f"no identity from the test shell: {ended}"
            record.console_tail = last_lines("\n".join(parsed.console), 25)
            return
        after = boot.Identity(parsed.proc_version, parsed.boot_id)
        record.after = after.to_json()
        problems = boot.prove(kernel, None, after)
        if problems:
            record.verdict, record.reason = "wrong kernel", "; ".join(problems)
            return
        self.log(
            f"{record.label}: proven: {parsed.proc_version.split(' (')[0]} {kernel.utsversion}, "
            f"boot_id {parsed.boot_id[:8]}"
        )
        record.tests = [self._result(b, early, parsed) for b in tests]
        if "tests_end" in times:
            record.timings["tests"] = times["tests_end"] - times["identity"]
        save_outputs(directory / "tests", record.tests)
        dmesg = "\n".join(parsed.dmesg) + "\n"
        (directory / "dmesg.txt").write_text(dmesg)
        record.files["dmesg"] = str(directory / "dmesg.txt")
        record.splats = scan_dmesg(dmesg, self.dmesg_ignore)
        record.conclude()
        if panic:
            record.verdict = "fail"
            record.reason = f"kernel panic during the tests: {parsed.console[panic[0]].strip()}"
            record.console_tail = last_lines("\n".join(parsed.console[: panic[0] + 1]), 25)
        elif not parsed.dmesg:
            record.verdict = "infra error" if kind in INFRASTRUCTURE else "error"
            record.reason = f"the test shell did not finish: {ended}"
            record.console_tail = last_lines("\n".join(parsed.console), 25)

    def _result(
        self, built: suite.Built, early: dict[str, TestResult], parsed: Parsed
    ) -> TestResult:
        spec = built.spec
        if spec.name in early:
            return early[spec.name]
        seen = parsed.tests.get(spec.name)
        if seen is None or "exit" not in seen:
            return TestResult(spec.name, "error", reason="not run: the job ended before it")
        stdout, stderr = "\n".join(seen["stdout"]), "\n".join(seen["stderr"])
        duration = float(seen.get("end", 0)) - float(seen.get("start", 0))
        timeout = spec.timeout or self.box.timeouts.test
        exit_status = int(seen["exit"])
        status, reason = judge(exit_status, duration, timeout, stdout, stderr)
        self.log(f"tests: {spec.name}: {status} ({duration:.1f}s)")
        return TestResult(
            spec.name,
            status,
            exit_status,
            duration,
            stdout,
            stderr,
            reason,
            metrics_of(stdout),
            spec.shown,
            spec.cells,
        )
