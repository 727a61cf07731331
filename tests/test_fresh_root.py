"""Proof of a fresh machine: in a minimal Debian root of this machine's release, made with
mmdebstrap, `bash ci/install.sh` and then `.venv/bin/invoke doctor` both pass.

The root gets what a fresh machine of this kind has besides Debian's minbase: its CA bundle,
resolv.conf and pip configuration (ca-certificates is installed, so the copied bundle is not
regenerated). Everything else (python3, git, the compilers, QEMU, ...) must come from
ci/install.sh. Daemons that packages would start (sshd) are kept from starting by a
policy-rc.d, as the root has no init.

The root is a tmpfs. The .debs are cached in ~/.cache/kseries/fresh-root/debs ($XDG_CACHE_HOME
respected): before mmdebstrap runs they are copied (hard-linked where they can be) into the
root's /var/cache/apt/archives, where both mmdebstrap's downloads and install.sh's apt-get
find them; after each step the root's new .debs go back into the cache, each written under a
scratch name and renamed, under the cache's lock, and at the end only the installed versions
are kept. Without a cache the test still passes, it only downloads everything. (pip
keeps no cache on these machines, so the Python packages are downloaded each run.) Before
anything is deleted, every mount under the root is detached (`umount -R -l`) and checked gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from kseries.core.files import exclusive, remove_stale, scratch_name
from kseries.core.run import STDOUT, run
from kseries.paths import PROJECT, cache_dir
from kseries.tree import KEYRING, find_debian_mirror, read_apt_sources

pytestmark = pytest.mark.slow

INCLUDE = ("ca-certificates",)  # the machine's CA trust is the machine's, not the toolkit's
PROJECT_IN_ROOT = "/root/kseries"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PIP_CONFIGS = (Path("/etc/pip.conf"), Path.home() / ".config/pip/pip.conf")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TIMEOUT = 3600.0
ROOT_TMPFS = "size=8g,mode=755"  # the installed root takes about 1.3 GB


def release() -> str:
    """This machine's Debian codename (VERSION_CODENAME in /etc/os-release)."""
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value.strip('"'):
            return value.strip('"')
    raise AssertionError("/etc/os-release names no VERSION_CODENAME")


def cache() -> Path:
    return cache_dir() / "fresh-root"


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def seed(archives: Path) -> int:
    """Put the cached .debs into a root's apt archive; return how many."""
    debs = cache() / "debs"
    archives.mkdir(parents=True, exist_ok=True)
    with exclusive(cache() / ".lock"):
        found = sorted(debs.glob("*.deb")) if debs.is_dir() else []
        for deb in found:
            _link_or_copy(deb, archives / deb.name)
    return len(found)


def harvest(archives: Path, keep: set[str] | None = None) -> int:
    """Add a root's new .debs to the cache, each whole or not at all; with `keep` (the file
    names of what the root has installed), drop the cached ones not in it (old versions)."""
    debs = cache() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    added = 0
    with exclusive(cache() / ".lock"):
        remove_stale(debs)
        for deb in sorted(archives.glob("*.deb")):
            target = debs / deb.name
            if not deb.is_file() or target.exists():
                continue
            scratch = scratch_name(target)
            _link_or_copy(deb, scratch)
            os.replace(scratch, target)
            added += 1
        if keep is not None:
            for old in debs.glob("*.deb"):
                if old.name not in keep:
                    old.unlink()
    return added


def installed_debs(root: Path) -> set[str]:
    """The archive file names of the packages installed in `root` (apt writes an epoch's
    colon as %3a)."""
    out = run(
        ["chroot", root, "dpkg-query", "-W", "-f", "${Package}_${Version}_${Architecture}\\n"],
        env={"PATH": CHROOT_PATH},
    ).stdout
    return {f"{line.replace(':', '%3a')}.deb" for line in out.split()}


def mmdebstrap(root: Path, log: Path) -> None:
    mirror = find_debian_mirror(read_apt_sources())
    suite = release()
    sources = [
        f"deb [signed-by={KEYRING}] {mirror} {name} main" for name in (suite, f"{suite}-updates")
    ]
    with log.open("ab") as out:
        run(
            [
                "mmdebstrap",
                "--variant=minbase",
                f"--include={','.join(INCLUDE)}",
                # The root's archive was seeded from the cache; keep it, and what is downloaded.
                "--skip=check/empty,essential/unlink,cleanup/apt/cache",
                suite,
                root,
                *sources,
            ],
            stdout=out,
            stderr=STDOUT,
            timeout=TIMEOUT,
            what="mmdebstrap",
            hint=f"see {log}",
        )


def project_files() -> list[str]:
    """The project as it is on disk: tracked and new files, without what git ignores (.venv)."""
    out = run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT
    ).stdout
    return sorted(name for name in out.split("\0") if name)


def furnish(root: Path) -> None:
    """What a fresh machine of this kind has besides minbase, and the project."""
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    shutil.copyfile(CA_BUNDLE, root / CA_BUNDLE.relative_to("/"))
    for config in PIP_CONFIGS:
        if config.is_file():
            inside = root / (  # the user's files go to root's home, /root, in the chroot
                Path("root", config.relative_to(Path.home()))
                if config.is_relative_to(Path.home())
                else config.relative_to("/")
            )
            inside.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config, inside)
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# no init here: packages must not start daemons\nexit 101\n")
    policy.chmod(0o755)
    project = root / PROJECT_IN_ROOT.lstrip("/")
    for name in project_files():
        source = PROJECT / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted, not yet committed
        target = project / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


def mountpoints(root: Path) -> list[str]:
    """Mount points at or under `root`, from /proc/self/mountinfo."""
    prefix = str(root.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


@contextmanager
def mounted(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev bound into the root (slaves: unmounting them later cannot
    propagate back to the machine's own), all detached afterwards, however the body ended."""
    try:
        for name in ("proc", "sys", "dev"):
            target = root / name
            target.mkdir(exist_ok=True)
            run(["mount", "--rbind", f"/{name}", target])
            run(["mount", "--make-rslave", target])
        yield
    finally:
        stop_processes(root)
        unmount(root, keep_root=True)


def unmount(root: Path, keep_root: bool = False) -> None:
    """Detach every mount under `root` (and `root` itself unless `keep_root`), and check."""

    def points() -> list[str]:
        return [p for p in mountpoints(root) if not (keep_root and p == str(root.resolve()))]

    for point in sorted(points(), key=len):
        if point in points():  # a parent's `-R` may have taken it already
            run(["umount", "-R", "-l", point], check=False)
    left = points()
    assert not left, f"still mounted under {root}: {left}; nothing was deleted"


def stop_processes(root: Path) -> None:
    """Kill, by pid, what this test started inside the root and left running."""
    prefix = str(root.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            inside = os.readlink(entry / "root")
        except OSError:
            continue
        if inside == prefix or inside.startswith(prefix + "/"):
            with suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def in_root(root: Path, command: str, log: Path, what: str) -> float:
    """Run `command` (sh) in the project's copy inside the root; its output goes to `log`."""
    env = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
    env |= {k: v for k, v in os.environ.items() if k.startswith(("PIP_", "PYTHON"))}
    started = time.monotonic()
    with log.open("ab") as out:
        out.write(f"\n$ {command}\n".encode())
        out.flush()
        ran = run(
            ["chroot", root, "/bin/sh", "-c", f"cd {PROJECT_IN_ROOT} && {command}"],
            env=env,
            stdout=out,
            stderr=STDOUT,
            timeout=TIMEOUT,
            check=False,
        )
    seconds = time.monotonic() - started
    if not ran.ok:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"{what} failed in the fresh root (exit {ran.status}); {log} ends:\n{tail}")
    return seconds


@pytest.fixture
def scratch_root(tmp_path: Path) -> Iterator[Path]:
    """An empty tmpfs (private: no mount under it propagates anywhere) for the root, under
    tmp_path, unmounted afterwards: that is the whole deletion, and a bound /dev or /sys is
    never deleted through (on this disk, mounted with `discard`, deleting the installed root
    file by file took 54 s; dpkg also unpacks faster into memory)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mmdebstrap's root mode, chroot and bind mounts")
    root = tmp_path / "root"
    root.mkdir()
    try:
        run(["mount", "-t", "tmpfs", "-o", ROOT_TMPFS, "kseries-fresh-root", root])
        run(["mount", "--make-private", root])
        yield root
    finally:
        stop_processes(root)
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)  # empty, unless the tmpfs could not be mounted


def test_install_then_doctor_pass_in_a_fresh_root(scratch_root: Path, tmp_path: Path) -> None:
    root = scratch_root
    log = tmp_path / "fresh-root.log"
    archives = root / "var/cache/apt/archives"
    timings: dict[str, float] = {}

    started = time.monotonic()
    seeded = seed(archives)
    mmdebstrap(root, log)
    timings["mmdebstrap"] = time.monotonic() - started
    harvest(archives)
    furnish(root)
    with mounted(root):
        try:
            timings["install.sh"] = in_root(root, "bash ci/install.sh", log, "ci/install.sh")
        finally:
            harvest(archives)
        timings["doctor"] = in_root(root, ".venv/bin/invoke doctor", log, "invoke doctor")
    harvest(archives, keep=installed_debs(root))

    text = log.read_text(errors="replace")
    assert "doctor: all" in text and "checks passed" in text
    print(  # shown with -s or -rA: the cost of the proof, cold or warm
        f"fresh root ({release()}, {seeded} cached .debs): "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    )
