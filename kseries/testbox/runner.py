"""Running the tests on a booted box, and reading its kernel log for splats.

Each test runs on its own exec channel under the box's `timeout -s KILL` (so a hung test does not
outlive its slot on the box) and a slightly longer client-side timeout (so a hung box does not
hang the tool). Output and exit status are kept; exit 4 is kselftest's SKIP. A test that ends
with a summary line (`NAME: result=PASS|FAIL|SKIP|ERROR key=value ...`) is judged by it, and its
key=value pairs are kept as the test's metrics.

The kernel log is scanned for WARNING:, BUG:, Oops, KVM_BUG_ON and Call Trace. A hit fails the
run and is shown with a few lines of context. Lines known to be benign (the vfio-noiommu taint
notice, which only says the kernel is now tainted) are never hits; more can be listed in
`[testbox] dmesg_ignore`.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kseries.errors import ToolkitError
from kseries.testbox.ssh import CommandTimeout, ConnectionLost, Remote, UploadError
from kseries.testbox.suite import SKIP_EXIT, Built

Log = Callable[[str], None]
SPLAT = re.compile(r"WARNING:|BUG:|Oops|KVM_BUG_ON|Call Trace")
BENIGN = (r"Adding kernel taint for vfio-noiommu group",)
GRACE = 15.0  # seconds the client waits beyond the box-side timeout
CELL = re.compile(r"^cell=(\S+)\s+(.*)$", re.MULTILINE)  # a matrix test's finished cell
SUMMARY = re.compile(r"^[\w.-]+: result=(PASS|FAIL|SKIP|ERROR)(?:\s+(.*))?$", re.MULTILINE)


@dataclass
class TestResult:
    __test__ = False  # not a pytest class, despite the name

    name: str
    status: str  # pass, fail, skip, timeout, error
    exit_status: int | None = None
    duration: float = 0.0
    stdout: str = ""
    stderr: str = ""
    reason: str = ""
    metrics: dict[str, str] = field(default_factory=dict)  # from the summary line
    shown: tuple[str, ...] = ()  # the metrics the soak report shows
    cells: tuple[str, ...] = ()  # a matrix test's columns: its metrics are CELL_METRIC

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": self.status,
            "exit_status": self.exit_status,
            "duration_s": round(self.duration, 3),
            "reason": self.reason,
            "metrics": self.metrics,
            **({"cells": list(self.cells), "shown": list(self.shown)} if self.cells else {}),
            "stdout": self.stdout,
            "stderr": self.stderr,
        }


@dataclass(frozen=True)
class Splat:
    line_number: int
    line: str
    context: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"line_number": self.line_number, "line": self.line, "context": self.context}


def scan_dmesg(text: str, ignore: Sequence[str] = ()) -> list[Splat]:
    """Every line matching a splat pattern, unless a benign pattern matches it."""
    benign = [re.compile(p) for p in (*BENIGN, *ignore)]
    lines = text.splitlines()
    hits = []
    for number, line in enumerate(lines, 1):
        if SPLAT.search(line) and not any(p.search(line) for p in benign):
            hits.append(
                Splat(number, line.rstrip(), [x.rstrip() for x in lines[number : number + 6]])
            )
    return hits


def upload_tests(
    remote: Remote, workdir: str, tests: Sequence[Built], log: Log
) -> dict[str, UploadError]:
    """Upload the programs and files the box does not already hold (same sha256, so a file
    two tests take goes once); test name -> the upload error that fails that test alone."""
    wanted: dict[str, tuple[bytes, str, list[str]]] = {}
    for built in tests:
        for path, (data, sha) in built.uploads(workdir).items():
            wanted.setdefault(path, (data, sha, []))[2].append(built.spec.name)
    if not wanted:
        return {}
    present = remote.sha256(*wanted)
    failed: dict[str, UploadError] = {}
    for path, (data, sha, names) in wanted.items():
        if present.get(path) == sha:
            continue
        try:
            remote.upload(data, path, mode="755")
            name = path.rsplit("/", 1)[-1]
            log(f"tests: uploaded {name} ({len(data) >> 10} KiB), sha256 verified")
        except UploadError as e:
            failed |= dict.fromkeys(names, e)
    return failed


def parse_summary(output: str) -> tuple[str, dict[str, str]] | None:
    """The last summary line's result and its key=value pairs (values may be quoted)."""
    found = SUMMARY.findall(output)
    if not found:
        return None
    result, rest = found[-1]
    return result.lower(), _pairs(rest)


def metrics_of(output: str) -> dict[str, str]:
    """The summary line's key=value pairs; without one (a test killed midway), what the
    matrix cells it finished printed on their `cell=NAME key=value ...` lines, as NAME_KEY."""
    summary = parse_summary(output)
    if summary is not None:
        return summary[1]
    found: dict[str, str] = {}
    for cell, rest in CELL.findall(output):
        found |= {f"{cell}_{key}": value for key, value in _pairs(rest).items()}
    return found


def _pairs(text: str) -> dict[str, str]:
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    return dict(w.split("=", 1) for w in words if "=" in w)


def command_line(
    built: Built, argv: Sequence[str], path: str, timeout: float, env: dict[str, str]
) -> str:
    """The test in its own session (setsid), killed as a whole process group by a watchdog
    at `timeout`: a plain `timeout CMD` kills only the shell, and a child left holding the
    channel's stdout would keep the test "running". Exit 137 then means killed."""
    spec = built.spec
    inner = spec.command or shlex.join([path, *argv])
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**env, **spec.env}.items())
    prefix = f"export {exports}; " if exports else ""
    return (
        f"{prefix}setsid sh -c {shlex.quote(inner)} & p=$!; "
        f"( sleep {max(1, int(timeout))}; kill -KILL -$p ) >/dev/null 2>&1 & w=$!; "
        "wait $p; s=$?; kill $w 2>/dev/null; exit $s"
    )


def kill_leftovers(remote: Remote, path: str) -> None:
    """After a client-side timeout: kill whatever still runs the test's program on the box."""
    script = (
        'for p in /proc/[0-9]*; do [ "$(readlink $p/exe)" = ' + shlex.quote(path) + " ] && "
        'kill -9 "${p##*/}"; done; true'
    )
    with contextlib.suppress(ToolkitError):
        remote.run(script, timeout=20)


def run_tests(
    remote: Remote,
    tests: Sequence[Built],
    *,
    workdir: str,
    default_timeout: float,
    env: dict[str, str],
    box_vars: dict[str, str],
    where: str,
    log: Log,
) -> list[TestResult]:
    failed = upload_tests(remote, workdir, tests, log)
    results = []
    for built in tests:
        spec = built.spec
        if built.error:
            results.append(TestResult(spec.name, "error", reason=built.error))
            continue
        if spec.name in failed:
            results.append(TestResult(spec.name, "error", reason=failed[spec.name].message))
            continue
        path = built.program_path(workdir)
        try:
            argv = spec.argv(box_vars, where, built.file_paths(workdir))
        except ToolkitError as e:
            results.append(TestResult(spec.name, "error", reason=str(e)))
            continue
        timeout = spec.timeout or default_timeout
        line = command_line(built, argv, path, timeout, env)
        started = time.monotonic()
        try:
            done = remote.run(line, timeout=timeout + GRACE)
        except CommandTimeout as e:
            if path:
                kill_leftovers(remote, path)
            results.append(
                TestResult(
                    spec.name,
                    "timeout",
                    None,
                    time.monotonic() - started,
                    e.stdout,
                    e.stderr,
                    f"no answer after {timeout + GRACE:g}s",
                    metrics_of(e.stdout),
                    spec.shown,
                    spec.cells,
                )
            )
            continue
        except ConnectionLost as e:
            results.append(
                TestResult(
                    spec.name,
                    "error",
                    None,
                    time.monotonic() - started,
                    reason=f"{e.message} (did the kernel crash?)",
                )
            )
            break
        status, reason = judge(done.exit_status, done.duration, timeout, done.stdout, done.stderr)
        results.append(
            TestResult(
                spec.name,
                status,
                done.exit_status,
                done.duration,
                done.stdout,
                done.stderr,
                reason,
                metrics_of(done.stdout),
                spec.shown,
                spec.cells,
            )
        )
        log(f"tests: {spec.name}: {status} ({done.duration:.1f}s)")
    for built in tests[len(results) :]:
        results.append(TestResult(built.spec.name, "error", reason="not run: the box went away"))
    return results


def judge(
    exit_status: int, duration: float, timeout: float, stdout: str, stderr: str
) -> tuple[str, str]:
    """pass/fail/skip/timeout/error and why: a kill at the timeout first, then the summary
    line if the test printed one, else the exit status."""
    if exit_status == 137 and duration >= timeout - 1:
        return "timeout", f"killed after {timeout:g}s"
    summary = parse_summary(stdout)
    if summary is not None:
        result, pairs = summary
        why = pairs.get("reason", "")
        if result == "pass" and exit_status != 0:
            return "fail", f"exit {exit_status} after result=PASS"
        if result == "pass":
            return "pass", ""
        return result, f"{why or result} (exit {exit_status})"
    if exit_status == SKIP_EXIT:
        return "skip", _last_line(stdout + stderr) or "exit 4 (KSFT_SKIP)"
    if exit_status != 0:
        return "fail", f"exit {exit_status}: " + _last_line(stderr or stdout)
    return "pass", ""


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:200] if lines else ""


def save_outputs(directory: Path, results: Sequence[TestResult]) -> None:
    """One file per test: a header line (status, exit, time, reason), stdout, then stderr."""
    directory.mkdir(exist_ok=True)
    for result in results:
        (directory / f"{result.name}.out").write_text(
            f"# {result.status} exit={result.exit_status} {result.duration:.2f}s "
            f"{result.reason}\n{result.stdout}"
            + (f"\n# --- stderr ---\n{result.stderr}" if result.stderr else "")
        )


def collect_dmesg(remote: Remote, timeout: float = 60) -> str:
    return remote.run("dmesg", timeout=timeout, check=True).stdout
