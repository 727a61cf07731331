"""`invoke doctor`: proof that every external tool the stages use works on this machine.

Each check runs the tool for real, in a scratch directory with stdin closed: gcc compiles and
links, the libelf and OpenSSL headers compile and their libraries link, git send-email
dry-runs a mail with To: and Cc: headers (which is what loads Perl's Mail::Address), keys are
generated. Installed is not enough: a tool whose library or Perl module is missing is found
here, not halfway through a pipeline. A failing check names the Debian package that fixes it,
from kseries.core.run.PACKAGES (the one table of which package has what).

The checks are data (CHECKS, one line of output each) and run in parallel threads.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kseries.core.run import INSTALL_HINT, PACKAGES, missing, run
from kseries.errors import ToolkitError
from kseries.testbox.initramfs import BUSYBOX, PROGRAMS

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

TIMEOUT = 30.0  # seconds per check; they take well under one, even on a busy machine
WORKERS = 8

HELLO_C = "int main(void) { return 0; }\n"
GELF_C = """\
#include <gelf.h>
int main(void) { return elf_version(EV_CURRENT) == EV_NONE; }
"""
OPENSSL_C = """\
#include <openssl/opensslv.h>
#include <openssl/crypto.h>
int main(void) { return OpenSSL_version_num() == 0; }
"""
# git send-email parses To: and Cc: headers with Mail::Address, loaded only then (a bare
# --help or a mail without them passes even when the module is missing). --to, or it asks.
MAIL = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: Doctor <doctor@example.org>
To: Some One <one@example.org>
Cc: other@example.org
Date: Mon, 1 Jan 2024 00:00:00 +0000
Subject: [PATCH] doctor: a mail that is never sent

Body.
---
 file | 1 +
 1 file changed, 1 insertion(+)
"""
# git without the user's or the system's configuration, with an identity, so only the tool is
# checked (send-email asks git for the committer and author idents).
GIT_ENV = {
    "HOME": "{dir}",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    **{f"GIT_{who}_NAME": "Doctor" for who in ("AUTHOR", "COMMITTER")},
    **{f"GIT_{who}_EMAIL": "doctor@example.org" for who in ("AUTHOR", "COMMITTER")},
}
# The Perl modules checkpatch.pl and get_maintainer.pl use (7.2's scripts/); the Python
# modules of checkpatch's SPDX check (scripts/spdxcheck.py) are checked apart.
KERNEL_PERL = (
    "Cwd",
    "Encode",
    "File::Basename",
    "File::Find",
    "File::Spec::Functions",
    "Getopt::Long",
    "JSON::PP",
    "POSIX",
    "Term::ANSIColor",
)


# The libraries a static qemu-system-x86_64 links, as PACKAGES keys ("pc:" + pkg-config name).
QEMU_LIBRARIES = tuple(
    f"pc:{name}"
    for name in ("glib-2.0", "libpcre2-8", "zlib", "mount", "blkid", "libselinux", "libsepol")
)


@dataclass(frozen=True)
class Probe:
    """One tool, run for real. `argv` runs in a fresh scratch directory of its own (relative
    paths are files there); "{dir}" in argv and env values is that directory's path."""

    what: str  # the line printed for it
    argv: tuple[str, ...]
    needs: tuple[str, ...]  # PACKAGES keys: the fix when it fails (a missing argv[0]: its own)
    files: Mapping[str, str] = field(default_factory=dict)  # written into the directory first
    env: Mapping[str, str] = field(default_factory=dict)
    input: str | None = None
    expect: str = ""  # stdout must contain this
    static: bool = False  # argv[0] must be statically linked (it goes into the initramfs alone)

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(PACKAGES[n] for n in self.needs))

    @property
    def shows_version(self) -> bool:
        """Whether its first line of output is worth printing (a version)."""
        return "--version" in self.argv or "-V" in self.argv


def _dynamic(name: str) -> str:
    return f"{name} (copied into the test box with its libraries) runs"


CHECKS: tuple[Probe, ...] = (
    Probe("git runs", ("git", "--version"), ("git",)),
    Probe(
        "git send-email dry-runs a mail with To: and Cc: (Perl's Mail::Address)",
        (
            "git",
            "send-email",
            "--dry-run",
            "--quiet",
            "--confirm=never",
            "--suppress-cc=all",
            "--from=Doctor <doctor@example.org>",
            "--to=one@example.org",
            "--smtp-server=/bin/false",
            "mail.patch",
        ),
        ("git-send-email", "perl:Mail::Address"),
        files={"mail.patch": MAIL},
        env=GIT_ENV,
        expect="Dry-Sent",
    ),
    Probe("perl loads Mail::Address", ("perl", "-MMail::Address", "-e1"), ("perl:Mail::Address",)),
    Probe(
        "perl loads checkpatch.pl's and get_maintainer.pl's modules",
        ("perl", *(f"-M{m}" for m in KERNEL_PERL), "-e1"),
        ("perl",),
    ),
    Probe(
        "python3 imports ply (checkpatch.pl's SPDX check)",
        ("/usr/bin/python3", "-c", "import ply.lex, ply.yacc"),
        ("python3:ply",),
    ),
    Probe(
        "python3 imports git (checkpatch.pl's SPDX check)",
        ("/usr/bin/python3", "-c", "import git"),
        ("python3:git",),
    ),
    Probe(
        "gcc compiles and links a C program",
        ("gcc", "-o", "hello", "hello.c"),
        ("gcc",),
        files={"hello.c": HELLO_C},
    ),
    Probe(
        "libelf: <gelf.h> compiles, -lelf links (objtool)",
        ("gcc", "-o", "elf", "elf.c", "-lelf"),
        ("gelf.h",),
        files={"elf.c": GELF_C},
    ),
    Probe(
        "openssl: <openssl/opensslv.h> compiles, -lcrypto links (sign-file, extract-cert)",
        ("gcc", "-o", "ssl", "ssl.c", "-lcrypto"),
        ("openssl/opensslv.h",),
        files={"ssl.c": OPENSSL_C},
    ),
    Probe(
        "make runs a Makefile",
        ("make", "-s", "-f", "Makefile"),
        ("make",),
        files={"Makefile": "all:\n\t@echo made\n"},
        expect="made",
    ),
    Probe(
        "flex generates a scanner",
        ("flex", "-o", "scan.c", "scan.l"),
        ("flex",),
        files={"scan.l": "%option noyywrap\n%%\n"},
    ),
    Probe(
        "bison generates a parser",
        ("bison", "-o", "parse.c", "parse.y"),
        ("bison",),
        files={"parse.y": "%%\nstart: %empty ;\n"},
    ),
    Probe("bc computes", ("bc", "-q"), ("bc",), input="2^10\n", expect="1024"),
    Probe("cpio runs", ("cpio", "--version"), ("cpio",)),
    Probe(
        "rsync copies a file (make headers_install)",
        ("rsync", "-a", "file", "copy"),
        ("rsync",),
        files={"file": "x\n"},
    ),
    Probe("xz runs (the kernel source tarball)", ("xz", "--version"), ("xz",)),
    Probe("dpkg-deb runs (the kernel source package)", ("dpkg-deb", "--version"), ("dpkg-deb",)),
    Probe(
        "ccache compiles through gcc",
        ("ccache", "gcc", "-c", "-o", "hello.o", "hello.c"),
        ("ccache",),
        files={"hello.c": HELLO_C},
        env={"CCACHE_DIR": "{dir}/ccache"},
    ),
    Probe(
        "distcc compiles through gcc (DISTCC_HOSTS=localhost)",
        ("distcc", "gcc", "-c", "-o", "hello.o", "hello.c"),
        ("distcc",),
        files={"hello.c": HELLO_C},
        env={"DISTCC_HOSTS": "localhost", "DISTCC_DIR": "{dir}"},
    ),
    Probe("qemu-system-x86_64 runs", ("qemu-system-x86_64", "--version"), ("qemu-system-x86_64",)),
    # The QEMU series (configs/qemu): its default tree, and its static build's tools and libraries
    Probe(
        "dpkg-source runs (the QEMU source package)", ("dpkg-source", "--version"), ("dpkg-source",)
    ),
    Probe("ninja runs (the QEMU build)", ("ninja", "--version"), ("ninja",)),
    Probe(
        "meson >= 1.5 imports in the toolkit's python (QEMU's configure)",
        (
            sys.executable,
            "-c",
            "import sys, mesonbuild.coredata as c; "
            "sys.exit(tuple(map(int, c.version.split('.')[:2])) < (1, 5))",
        ),
        (),
    ),
    Probe(
        "pkg-config --static finds the static QEMU's libraries",
        ("pkg-config", "--static", "--exists", *(n[3:] for n in QEMU_LIBRARIES)),
        ("pkg-config", *QEMU_LIBRARIES),
    ),
    Probe(
        f"{BUSYBOX} is static and lists its applets (the test box's userspace)",
        (BUSYBOX, "--list-full"),
        ("busybox",),
        static=True,
    ),
    *(
        Probe(
            _dynamic(program),
            (program, "-V" if Path(program).name == "dropbear" else "--version"),
            (Path(program).name,),
        )
        for program in PROGRAMS
    ),
    Probe(
        "dropbearkey generates the box's host key",
        ("dropbearkey", "-t", "ed25519", "-f", "host_key"),
        ("dropbearkey",),
    ),
    Probe(
        "ssh-keygen generates a key (stdin closed)",
        ("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "doctor", "-f", "id_ed25519"),
        ("ssh-keygen",),
    ),
    Probe("ssh runs", ("ssh", "-V"), ("ssh",)),
    # tests/test_review.py: the maintainer's end of the review loop, a real list archive
    Probe(
        "public-inbox-init makes a v2 inbox",
        (
            "public-inbox-init",
            "-V2",
            "doctor",
            "inbox",
            "http://127.0.0.1/doctor",
            "doctor@example.org",
        ),
        ("public-inbox-init",),
        env={"PI_CONFIG": "{dir}/config", "HOME": "{dir}"},
    ),
    *(
        Probe(
            f"{tool} compiles with its modules ({what})",
            ("perl", "-c", f"/usr/bin/{tool}"),
            (tool,),
        )
        for tool, what in (
            ("public-inbox-mda", "delivers mail into the inbox"),
            ("public-inbox-httpd", "serves the inbox over HTTP"),
        )
    ),
)


@dataclass(frozen=True)
class ProbeResult:
    check: Probe
    ok: bool
    detail: str  # on success the tool's version, if it was asked; on failure the reason
    fix: str = ""  # on failure: the package to install
    packages: tuple[str, ...] = ()


def diagnose(
    checks: tuple[Probe, ...] = CHECKS, env: Mapping[str, str] | None = None
) -> list[ProbeResult]:
    """Run every check (in parallel) and return their results in the table's order."""
    base = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="kseries-doctor-") as scratch:
        directories = []
        for number, _ in enumerate(checks):
            directory = Path(scratch) / f"{number:02d}"
            directory.mkdir()
            directories.append(directory)
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            return list(pool.map(lambda c, d: _run(c, d, base), checks, directories))


def _run(check: Probe, directory: Path, base: Mapping[str, str]) -> ProbeResult:
    def result(ok: bool, detail: str, packages: tuple[str, ...] = ()) -> ProbeResult:
        fix = INSTALL_HINT.format(package=" ".join(packages)) if packages else ""
        return ProbeResult(check, ok, detail, fix, packages)

    def fill(text: str) -> str:
        return text.replace("{dir}", str(directory))

    env = {**base, **{k: fill(v) for k, v in check.env.items()}}
    program = check.argv[0]
    if shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        name = Path(program).name
        return result(False, missing(program).message, (PACKAGES.get(name, name),))
    if check.static and not _is_static(program):
        return result(False, f"{program} is dynamically linked", check.packages)
    for name, text in check.files.items():
        (directory / name).write_text(text)
    try:
        ran = run(
            [fill(a) for a in check.argv],
            cwd=directory,
            env=env,
            input=check.input,
            timeout=TIMEOUT,
            check=False,
        )
    except ToolkitError as e:  # timed out
        return result(False, e.message, check.packages)
    if not ran.ok:
        reason = _first_line(ran.stderr) or _first_line(ran.stdout)
        return result(False, f"exit status {ran.status}: {reason}", check.packages)
    if check.expect and check.expect not in ran.stdout:
        reason = f"printed no {check.expect!r}: {_first_line(ran.stdout + ran.stderr)}"
        return result(False, reason, check.packages)
    version = (_first_line(ran.stdout) or _first_line(ran.stderr)) if check.shows_version else ""
    return result(True, version)


def _first_line(text: str, width: int = 100) -> str:
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    return line if len(line) <= width else line[: width - 3] + "..."


def _is_static(path: str) -> bool:
    """Whether an ELF file has no program interpreter (PT_INTERP), i.e. needs no ld.so."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF":
            return False
        order = "<" if header[5] == 1 else ">"
        if header[4] == 2:  # ELFCLASS64
            (phoff,) = struct.unpack_from(order + "Q", header, 0x20)
            size, count = struct.unpack_from(order + "HH", header, 0x36)
        else:
            (phoff,) = struct.unpack_from(order + "I", header, 0x1C)
            size, count = struct.unpack_from(order + "HH", header, 0x2A)
        f.seek(phoff)
        table = f.read(size * count)
    pt_interp = 3
    return all(
        struct.unpack_from(order + "I", table, i * size)[0] != pt_interp for i in range(count)
    )


def lines(results: list[ProbeResult]) -> list[str]:
    """Plain output: one line per check, a failure with its fix."""
    out = []
    for r in results:
        if r.ok:
            out.append(f"ok    {r.check.what}" + (f" ({r.detail})" if r.detail else ""))
        else:
            out.append(f"FAIL  {r.check.what}: {r.detail}; fix: {r.fix}")
    return out


def table(results: list[ProbeResult]) -> Table:
    from rich.markup import escape
    from rich.table import Table

    grid = Table(title="doctor", title_justify="left")
    grid.add_column("")
    grid.add_column("check")
    grid.add_column("result")
    for r in results:
        if r.ok:
            grid.add_row("[green]ok[/]", escape(r.check.what), f"[dim]{escape(r.detail)}[/]")
        else:
            text = f"[red]{escape(r.detail)}[/]\nfix: {escape(r.fix)}"
            grid.add_row("[red]FAIL[/]", escape(r.check.what), text)
    return grid


def verdict(results: list[ProbeResult], seconds: float) -> str:
    """The summary line; raises ToolkitError (with every package to install) on a failure."""
    failed = [r for r in results if not r.ok]
    if failed:
        packages = " ".join(dict.fromkeys(p for r in failed for p in r.packages))
        raise ToolkitError(
            f"doctor: {len(failed)} of {len(results)} checks failed",
            INSTALL_HINT.format(package=packages),
        )
    return f"doctor: all {len(results)} checks passed in {seconds:.1f} s"


def main(console: Console) -> None:
    """The task: run the checks, show them (a table on a terminal, plain lines off one)."""
    started = time.monotonic()
    results = diagnose()
    if console.is_terminal:
        console.print(table(results))
    else:
        for line in lines(results):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(verdict(results, time.monotonic() - started), markup=False, highlight=False)
