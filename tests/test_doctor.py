"""`invoke doctor`: every check passes here, and a failing one names its package and the fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from kseries import doctor
from kseries.core.run import PACKAGES
from kseries.paths import PROJECT


def test_every_check_passes_on_this_machine() -> None:
    results = doctor.diagnose()
    failed = [line for r, line in zip(results, doctor.lines(results), strict=True) if not r.ok]
    assert not failed, "\n".join(failed)
    assert len(results) == len(doctor.CHECKS)


def _path_without(tmp_path: Path, hidden: str) -> Path:
    """A directory of links to every program on PATH except `hidden`."""
    farm = tmp_path / "bin"
    farm.mkdir()
    for directory in [*os.environ["PATH"].split(os.pathsep), "/usr/sbin", "/sbin"]:
        if not Path(directory).is_dir():
            continue
        for program in Path(directory).iterdir():
            link = farm / program.name
            if program.name != hidden and not link.exists() and not link.is_symlink():
                link.symlink_to(program)
    return farm


def test_a_missing_and_a_broken_tool_are_named_with_their_packages(tmp_path: Path) -> None:
    """The real task in a subprocess: flex removed from PATH, bc replaced by one that fails."""
    farm = _path_without(tmp_path, "flex")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bc").write_text("#!/bin/sh\necho 'bc: cannot load its library' >&2\nexit 2\n")
    (broken / "bc").chmod(0o755)
    env = {**os.environ, "PATH": f"{broken}:{farm}"}
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "doctor"],
        cwd=PROJECT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert (
        "FAIL  flex generates a scanner: flex is not installed; "
        "fix: run `bash ci/install.sh` (or `apt-get install flex`)"
    ) in out
    assert (
        "FAIL  bc computes: exit status 2: bc: cannot load its library; "
        "fix: run `bash ci/install.sh` (or `apt-get install bc`)"
    ) in out
    assert "ok    gcc compiles and links a C program" in out  # the others still ran
    assert "error: doctor: 2 of" in done.stderr
    assert "hint: run `bash ci/install.sh` (or `apt-get install flex bc`)" in done.stderr


def test_send_email_without_mail_address_names_libmailtools(tmp_path: Path) -> None:
    """What a fresh root showed: git-email installed, Mail::Address (a Recommends) not."""
    fake = tmp_path / "perl" / "Mail"
    fake.mkdir(parents=True)
    (fake / "Address.pm").write_text("die 'Mail::Address is not installed';\n")
    perl_lib = str(tmp_path / "perl")
    env = {**os.environ, "PERL5LIB": perl_lib, "GITPERLLIB": f"{perl_lib}:/usr/share/perl5"}
    checks = tuple(c for c in doctor.CHECKS if "perl:Mail::Address" in c.needs)
    assert len(checks) == 2
    for result in doctor.diagnose(checks, env=env):
        assert not result.ok
        assert "libmailtools-perl" in result.fix


def test_a_dynamic_busybox_is_refused() -> None:
    """The initramfs copies busybox alone: Debian's dynamic `busybox` package will not do."""
    check = doctor.Probe("static", ("/usr/bin/true",), ("busybox",), static=True)
    (result,) = doctor.diagnose((check,))
    assert not result.ok
    assert result.detail == "/usr/bin/true is dynamically linked"
    assert "apt-get install busybox-static" in result.fix
    busybox = next(c for c in doctor.CHECKS if c.static)
    assert doctor._is_static(busybox.argv[0])


def test_ci_install_sh_installs_every_package_doctor_names() -> None:
    text = (PROJECT / "ci/install.sh").read_text()
    block = re.search(r"^APT_PACKAGES=\((.*?)^\)", text, re.MULTILINE | re.DOTALL)
    assert block
    listed = {w for line in block[1].splitlines() for w in line.split("#")[0].split()}
    named = {p for c in doctor.CHECKS for p in c.packages}
    named |= {PACKAGES.get(Path(c.argv[0]).name, Path(c.argv[0]).name) for c in doctor.CHECKS}
    assert named - listed == set()


def test_ci_runs_doctor_right_after_install() -> None:
    for script in ("ci/main.sh", "ci/test.sh"):
        lines = (PROJECT / script).read_text().splitlines()
        at = lines.index("bash ci/install.sh")
        assert lines[at + 1].startswith(".venv/bin/invoke doctor"), script
