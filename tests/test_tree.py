"""The embedded default tree: mirror discovery, the .gitignore fix, and the import itself."""

from __future__ import annotations

import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from kseries import tree
from kseries.errors import ToolkitError
from kseries.tree import (
    find_debian_mirror,
    prepare_default_tree,
    read_apt_sources,
    strip_debian_gitignore,
)

ONE_LINE = textwrap.dedent("""\
    # deb http://commented.example.org/debian bookworm main
    deb http://archive.example.com/ubuntu noble main
    deb-src [arch=amd64] http://mirror.example.org/debian-security bookworm-security main
    deb [ arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg ] \
http://mirror.example.org/debian/ bookworm main contrib  # the main archive
    deb http://second.example.org/debian trixie main
    """)

DEB822 = textwrap.dedent("""\
    Types: deb
    URIs: http://off.example.org/debian
    Suites: sid
    Components: main
    Enabled: no

    Types: deb
    # a snapshot of the security archive
    URIs: http://mirror.example.net/debian-security
    Suites: bookworm-security
    Components: main

    Types: deb
    URIs: http://other.example.net/ubuntu
    Suites: noble
    Components: main

    Types: deb deb-src
    URIs: http://snapshot.example.net/archive/debian/20250520T000000Z
     http://mirror.example.net/debian
    Suites: bookworm bookworm-updates
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
    """)

UPSTREAM_GITIGNORE = textwrap.dedent("""\
    # SPDX-License-Identifier: GPL-2.0-only
    .*
    *.o

    # bc language scripts (not LLVM bitcode)
    !kernel/time/timeconst.bc
    """)

DEBIAN_STANZA = textwrap.dedent("""\

    #
    # Debian packaging: ignore everything at the top level, since it isn't
    # included in our repository
    #
    /*
    !/debian/
    """)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


# --- the mirror ------------------------------------------------------------------------------


def test_one_line_sources_skip_comments_security_and_other_distributions() -> None:
    assert find_debian_mirror({"/etc/apt/sources.list": ONE_LINE}) == (
        "http://mirror.example.org/debian"
    )


def test_deb822_sources_skip_disabled_security_snapshot_and_other_distributions() -> None:
    sources = {"/etc/apt/sources.list.d/debian.sources": DEB822}
    assert find_debian_mirror(sources) == "http://mirror.example.net/debian"


def test_first_file_with_a_mirror_wins() -> None:
    sources = {
        "/etc/apt/sources.list": "deb http://archive.example.com/ubuntu noble main\n",
        "/etc/apt/sources.list.d/debian.sources": DEB822,
        "/etc/apt/sources.list.d/z.list": "deb http://late.example.org/debian sid main\n",
    }
    assert find_debian_mirror(sources) == "http://mirror.example.net/debian"


def test_no_mirror_names_the_files_searched_and_the_setting() -> None:
    sources = {
        "/etc/apt/sources.list": "deb http://archive.example.com/ubuntu noble main\n",
        "/etc/apt/sources.list.d/security.sources": (
            "Types: deb\nURIs: http://mirror.example.net/debian-security\n"
            "Suites: bookworm-security\nComponents: main\n"
        ),
    }
    with pytest.raises(ToolkitError) as raised:
        find_debian_mirror(sources)
    assert "/etc/apt/sources.list," in raised.value.message
    assert "security.sources" in raised.value.message
    assert "default_tree.mirror" in raised.value.hint


def test_read_apt_sources_reads_list_and_sources_files_only(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "a.list").write_text(ONE_LINE)
    (tmp_path / "sources.list.d" / "old.list.disabled").write_text("deb http://x/debian sid m\n")
    texts = read_apt_sources(tmp_path)
    assert list(texts) == [
        str(tmp_path / "sources.list.d" / "a.list"),
        str(tmp_path / "sources.list.d" / "debian.sources"),
    ]
    assert find_debian_mirror(texts) == "http://mirror.example.org/debian"


# --- the .gitignore ----------------------------------------------------------------------------


def test_debian_stanza_is_stripped_exactly() -> None:
    assert strip_debian_gitignore(UPSTREAM_GITIGNORE + DEBIAN_STANZA) == UPSTREAM_GITIGNORE


def test_gitignore_without_the_stanza_is_unchanged() -> None:
    assert strip_debian_gitignore(UPSTREAM_GITIGNORE) == UPSTREAM_GITIGNORE


def test_reworded_stanza_fails_loudly() -> None:
    reworded = UPSTREAM_GITIGNORE + "\n# Debian: everything at the top\n/*\n!/debian/\n"
    with pytest.raises(ToolkitError, match="/\\*"):
        strip_debian_gitignore(reworded)


# --- the command helper ------------------------------------------------------------------------


def test_run_failure_carries_the_last_stderr_lines() -> None:
    script = "import sys; [print(f'line {n}', file=sys.stderr) for n in range(5)]; sys.exit(3)"
    with pytest.raises(ToolkitError) as raised:
        tree.run(["python3", "-c", script], hint="try again", what="the script")
    assert raised.value.message == "the script failed (exit 3): line 2; line 3; line 4"
    assert raised.value.hint == "try again"


def test_missing_program_is_a_toolkit_error() -> None:
    with pytest.raises(ToolkitError, match="not installed"):
        tree.run(["kseries-no-such-program"])


# --- the whole preparation, offline, from a small fake package ---------------------------------


def make_fake_deb(root: Path, package: str = "linux-source-7.2") -> Path:
    """A .deb shaped like Debian's linux-source: usr/src/PACKAGE.tar.xz with the stanza."""
    work = root / "fake"
    source = work / package
    (source / "arch/x86/kvm/mmu").mkdir(parents=True)
    (source / "Makefile").write_text("VERSION = 7\nPATCHLEVEL = 2\nSUBLEVEL = 13\nEXTRAVERSION =\n")
    (source / "arch/x86/kvm/mmu/mmu.c").write_text("int mmu;\n")
    (source / "arch/x86/kvm/.gitignore").write_text("*.s\n")
    (source / ".gitignore").write_text(UPSTREAM_GITIGNORE + DEBIAN_STANZA)
    (source / "scripts").mkdir()
    (source / "scripts/run.sh").write_text("#!/bin/sh\n")
    (source / "scripts/run.sh").chmod(0o755)
    (source / "scripts/link").symlink_to("run.sh")
    pkg = work / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: 7.2.13-1\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: fake kernel source\n"
    )
    (pkg / "usr/src").mkdir(parents=True)
    subprocess.run(
        ["tar", "-cJf", str(pkg / f"usr/src/{package}.tar.xz"), "-C", str(work), package],
        check=True,
    )
    deb = root / f"{package}_7.2.13-1_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


def test_prepare_from_a_cached_deb_resumes_and_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "default-tree"
    root.mkdir()
    make_fake_deb(root)
    # What an interrupted run leaves: half-extracted and half-cloned partial directories.
    (root / ".linux.partial/linux-source-7.2").mkdir(parents=True)
    (root / ".kvm-x86.git.partial").mkdir()
    lines: list[str] = []

    first = prepare_default_tree(root=root, mirror="http://unused.invalid/debian", log=lines.append)

    assert first.path == (root / "linux").resolve()
    assert first.remote_url == str((root / "kvm-x86.git").resolve())
    assert not (root / ".linux.partial").exists()
    assert not (root / ".kvm-x86.git.partial").exists()
    assert lines[-1].startswith("default tree: ready in ")
    work = first.path
    assert git(work, "status", "--porcelain") == ""
    assert git(work, "symbolic-ref", "HEAD") == "refs/heads/master"
    assert git(work, "rev-parse", "refs/remotes/kvm-x86/next") == first.base_commit
    assert git(work, "log", "-1", "--format=%an <%ae> %s") == (
        "kseries default tree <kseries@localhost> Linux 7.2.13 (Debian linux-source-7.2 7.2.13-1)"
    )
    files = git(work, "ls-files", "-s").splitlines()
    assert any(line.startswith("100755") and line.endswith("scripts/run.sh") for line in files)
    assert any(line.startswith("120000") and line.endswith("scripts/link") for line in files)
    # Debian's stanza is gone, and the dot-files its .gitignore would ignore are committed.
    assert "arch/x86/kvm/.gitignore" in git(work, "ls-files")
    assert "!/debian/" not in (work / ".gitignore").read_text()
    assert "count: 0" in git(work, "count-objects", "-v").splitlines()  # all packed: no auto-gc
    bare = root / "kvm-x86.git"
    assert git(bare, "for-each-ref", "--format=%(refname)") == "refs/heads/next"
    assert git(bare, "rev-parse", "next") == first.base_commit

    lines.clear()
    again = prepare_default_tree(root=root, log=lines.append)
    assert again == first
    assert lines == []

    # A fixed identity and fixed dates: a second import of the same package, the same sha.
    other = tmp_path / "other"
    other.mkdir()
    make_fake_deb(other)
    assert prepare_default_tree(root=other, log=lines.append).base_commit == first.base_commit


def test_prepare_repairs_the_remote_and_follows_a_moved_branch(tmp_path: Path) -> None:
    root = tmp_path / "default-tree"
    root.mkdir()
    make_fake_deb(root)
    first = prepare_default_tree(root=root, log=lambda line: None)
    bare = Path(first.remote_url)
    # Upstream moves on: a new commit on the bare repository's next.
    ident = ["-c", "user.name=Up", "-c", "user.email=up@example.org"]
    moved = git(
        bare,
        *ident,
        "commit-tree",
        "-p",
        first.base_commit,
        "-m",
        "more",
        f"{first.base_commit}^{{tree}}",
    )
    git(bare, "update-ref", "refs/heads/next", moved)
    git(first.path, "remote", "remove", "kvm-x86")

    again = prepare_default_tree(root=root, log=lambda line: None)

    assert again == first  # the base is the imported commit, wherever next went
    assert git(first.path, "remote", "get-url", "kvm-x86") == first.remote_url
    assert git(first.path, "rev-parse", "refs/remotes/kvm-x86/next") == moved


def test_a_foreign_directory_in_the_way_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "linux").mkdir()
    (tmp_path / "linux/mine.txt").write_text("keep me\n")
    with pytest.raises(ToolkitError, match="not a default tree"):
        prepare_default_tree(root=tmp_path, log=lambda line: None)
    assert (tmp_path / "linux/mine.txt").read_text() == "keep me\n"


# --- the real thing ----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_default_tree() -> None:
    """Downloads and imports linux-source-7.2 the first time (minutes); then all cached."""
    result = prepare_default_tree()
    work = result.path
    # The user (or `invoke pipeline`) may have checked out the series branch since the import:
    # what the import made is master at the base, and a clean tree.
    assert git(work, "status", "--porcelain", "--untracked-files=no") == ""
    assert git(work, "rev-parse", "refs/heads/master") == result.base_commit
    git(work, "cat-file", "-e", f"{result.base_commit}:arch/x86/kvm/mmu/mmu.c")
    assert git(work, "rev-parse", "refs/remotes/kvm-x86/next") == git(
        Path(result.remote_url), "rev-parse", "refs/heads/next"
    )
    assert git(work, "rev-parse", "refs/remotes/kvm-x86/next") == result.base_commit

    started = time.monotonic()
    again = prepare_default_tree()
    assert time.monotonic() - started < 10
    assert again.base_commit == result.base_commit
