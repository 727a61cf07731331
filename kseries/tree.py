"""The embedded default tree, for a machine with no git tree of the project and no way to clone one.

The toolkit rebases a series onto its base (`kvm-x86/next`, `qemu/master`). Offline, the only
source within reach is a Debian package, so we import it as a git tree with one commit made with
a fixed identity and fixed dates (the same sha on every machine) and serve it to that tree as
the base remote from a local bare repository. How the package is fetched is data
([default_tree] fetch): the kernel's `linux-source-X.Y` is a binary .deb holding the tarball
("deb"); QEMU is a source package, fetched with `apt-get source` and unpacked with Debian's
patches applied by `dpkg-source -x` ("source").

Every step builds into a `.NAME.partial` sibling and renames it into place only when complete,
so an interrupted run is redone from the last finished step and a finished step is skipped.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

from kseries.config import STRING, Config, Keys, Kind
from kseries.core import run as door
from kseries.core.files import exclusive
from kseries.core.run import Ran
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.paths import default_tree_dir
from kseries.series import BASE

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_ETC = Path("/etc/apt")
CONFIG_HINT = "set default_tree.mirror in configs/toolkit.toml (or configs/local.toml)"
INSTALL_HINT = "run `bash ci/install.sh`, which installs the system packages the toolkit needs"

# Debian's archive suites (codenames and aliases); `bookworm-updates` and the like count too.
DEBIAN_SUITES = frozenset(
    (  # noqa: SIM905 (a word list reads better than 27 one-word lines)
        "buzz rex bo hamm slink potato woody sarge etch lenny squeeze wheezy jessie stretch buster "
        "bullseye bookworm trixie forky duke sid stable testing unstable oldstable oldoldstable "
        "experimental"
    ).split()
)

# The stanza Debian's packaging appends to the top-level .gitignore (its own git repository
# holds only debian/). Left in, it ignores every top-level entry, so nothing would be added.
# Matched as: an optional blank line, a comment block naming "Debian packaging", `/*`,
# `!/debian/`.
DEBIAN_GITIGNORE_STANZA = re.compile(
    r"(?:^\n)?(?:^#[^\n]*\n)*^#[^\n]*Debian packaging[^\n]*\n(?:^#[^\n]*\n)*^/\*\n^!/debian/\n?",
    re.MULTILINE,
)

# The imported commit's identity is fixed so its sha is the same on every machine.
IDENTITY = ("kseries default tree", "kseries@localhost")
FALLBACK_DATE = "1767225600 +0000"  # 2026-01-01, if the package carries no Debian changelog
GIT_CONFIG = ("-c", "core.autocrlf=false", "-c", "gc.auto=0", "-c", "maintenance.auto=false")
MIN_FREE_BYTES = 4 << 30  # .deb, extracted .deb, 1.8 GB source and its packed git objects

TREE = Keys({"path": STRING})  # empty: the default tree
FETCH = ("deb", "source")  # a binary .deb with usr/src/PACKAGE.tar.xz, or a source package
DEFAULT_TREE = Keys(
    {
        "package": STRING,
        "suite": STRING,
        "mirror": STRING,
        "fetch": Kind("deb or source", lambda v: v in FETCH, '"source"'),
        "version": STRING,  # the source package's version (fetch = "source"); empty: the newest
    }
)


@dataclass(frozen=True)
class DefaultTree:
    """The prepared tree: what a stage needs to work in it and to fetch its base."""

    path: Path  # the work tree, on master, clean
    remote_url: str  # the bare repository's path, the URL of the kvm-x86 remote
    base_commit: str  # sha of the imported commit, the same on every machine


def prepare_default_tree(
    *,
    package: str = "linux-source-7.2",
    suite: str = "sid",
    mirror: str = "",
    remote: str = "kvm-x86",
    branch: str = "next",
    fetch: str = "deb",
    version: str = "",
    root: Path | None = None,
    log: Callable[[str], None] = print,
) -> DefaultTree:
    """Build (or find, already built) the default tree under `root` and return it.

    `root` defaults to ~/.cache/kseries/default-tree for the kernel's .deb and to
    ~/.cache/kseries/default-tree-PACKAGE for a source package. `mirror` (a Debian archive URL)
    is only needed the first time, to download the package; empty means the one this machine's
    apt sources use. Raises ToolkitError for anything the user can fix.
    """
    if root is None:
        root = default_tree_dir("" if fetch == "deb" else package)
    root = Path(root)
    timings: list[tuple[str, float]] = []
    started = time.monotonic()
    try:
        root.mkdir(parents=True, exist_ok=True)
        waiting = f"default tree: waiting for another run to finish with {root}"
        with exclusive(root / ".lock", waiting, log):
            for stale in root.glob(".*.partial"):  # what an interrupted run left behind
                shutil.rmtree(stale)
            work = root / ("linux" if fetch == "deb" else package)
            bare = root / f"{remote}.git"
            base = _rev(work, "refs/kseries/base")
            if base is None and work.exists():
                raise ToolkitError(
                    f"{work} exists but is not a default tree this toolkit made",
                    "move it away; the next run rebuilds it",
                )
            if base is None:
                _check_free_space(root)
                if fetch == "source":
                    base = _import_source(root, package, suite, version, mirror, work, timings, log)
                else:
                    deb = _find_deb(root, package)
                    if deb is None:
                        with _timed(timings, "download"):
                            deb = _download(root, package, suite, mirror, log)
                    base = _import(root, deb, package, work, timings, log)
            if _rev(bare, f"refs/heads/{branch}") is None:
                with _timed(timings, "clone"):
                    _make_bare(root, work, bare, base, branch, log)
            url = str(bare.resolve())
            if not _remote_is_current(work, bare, remote, branch, url):
                with _timed(timings, "remote"):
                    _add_remote(work, remote, branch, url, log)
    except OSError as e:
        raise ToolkitError(
            f"default tree: {e}", f"check the space and permissions of {root}"
        ) from e
    if timings:
        steps = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings)
        log(f"default tree: ready in {time.monotonic() - started:.1f}s ({steps})")
    return DefaultTree(path=work.resolve(), remote_url=url, base_commit=base)


def open_tree(config: Config, override: str = "", log: Callable[[str], None] = print) -> WorkTree:
    """The tree a task works in: --tree, else tree.path from configs/, else the default tree.

    Only the last case touches the network or the cache; a configured tree is used as it is.
    """
    # both checked even when unused, so a typo there does not wait for the day it matters
    config.table("tree", TREE)
    config.table("default_tree", DEFAULT_TREE)
    if override:
        return WorkTree(Path(override))
    configured = config.path("tree.path")
    if configured is not None:
        return WorkTree(configured)
    return WorkTree(default_tree_of(config, log).path)


def default_tree_of(config: Config, log: Callable[[str], None] = print) -> DefaultTree:
    """The default tree `config`'s [default_tree] and [base] describe, prepared."""
    base = config.table("base", BASE)
    return prepare_default_tree(
        **{k: v for k, v in config.table("default_tree", DEFAULT_TREE).items() if v != ""},
        remote=base.get("remote") or "kvm-x86",
        branch=base.get("branch") or "next",
        log=log,
    )


def scratch_clone(
    dest: Path, remote: str = "kvm-x86", branch: str = "master", config: Config | None = None
) -> Path:
    """A `git clone --shared` of the default tree at `dest`, on `branch` at the base: the
    kernel's, or the one `config` describes (configs/qemu: QEMU's).

    Tests and benchmarks work there, so the cached tree stays as its user left it; the
    objects are shared, so only the checkout costs time.
    """
    if config is None:
        default = prepare_default_tree(log=lambda _: None)
    else:
        default = default_tree_of(config, lambda _: None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    git(dest.parent, "clone", "-q", "--shared", "-o", remote, default.remote_url, str(dest))
    git(dest, "checkout", "-q", "-B", branch)  # -B: a clone of qemu.git is on master already
    return dest


# --- the Debian mirror, from the machine's own apt sources ------------------------------------


def read_apt_sources(etc: Path = APT_ETC) -> dict[str, str]:
    """The texts of sources.list and sources.list.d/*.{list,sources}, by path, in apt's order."""
    paths = [etc / "sources.list"]
    parts = etc / "sources.list.d"
    if parts.is_dir():
        paths += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    texts = {}
    for path in paths:
        try:
            texts[str(path)] = path.read_text(errors="replace")
        except OSError:
            continue
    return texts


def find_debian_mirror(sources: Mapping[str, str]) -> str:
    """The first Debian archive URI in `sources` (path -> text), e.g. ".../debian".

    Pure, for tests. Skips the security archive, ports, snapshots and other distributions: only
    a URI whose path ends in /debian, listed with a Debian suite, is the main archive, which is
    the one that has sid. A path ending in `.sources` is read as deb822, anything else as the
    one-line format.
    """
    for name, text in sources.items():
        entries = _deb822_entries(text) if name.endswith(".sources") else _one_line_entries(text)
        for uris, suites in entries:
            if not any(_is_debian_suite(s) for s in suites):
                continue
            for uri in uris:
                if urlsplit(uri).path.rstrip("/").endswith("/debian"):
                    return uri.rstrip("/")
    searched = ", ".join(sources) or "no apt source files"
    raise ToolkitError(
        f"no Debian archive mirror found in the apt sources ({searched})", CONFIG_HINT
    )


def _is_debian_suite(suite: str) -> bool:
    return suite.split("/")[0].split("-")[0] in DEBIAN_SUITES


def _one_line_entries(text: str) -> Iterator[tuple[list[str], list[str]]]:
    """(URIs, suites) of each `deb [options] URI SUITE COMPONENT...` line."""
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words or words[0] not in ("deb", "deb-src"):
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options, which may contain spaces
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            yield [words[0]], [words[1]]


def _deb822_entries(text: str) -> Iterator[tuple[list[str], list[str]]]:
    """(URIs, suites) of each enabled deb822 stanza of Types deb/deb-src."""
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        types = fields.get("types", "").split()
        if fields.get("enabled", "yes").lower() == "no" or not {"deb", "deb-src"} & set(types):
            continue
        yield fields.get("uris", "").split(), fields.get("suites", "").split()


# --- step 1: download the package with a private apt configuration -----------------------------


def _find_deb(root: Path, package: str) -> Path | None:
    debs = sorted(root.glob(f"{package}_*.deb"))
    return debs[-1] if debs else None


def _private_apt(
    root: Path, line: str, package: str, suite: str, mirror: str, log: Callable[[str], None]
) -> tuple[list[str], str]:
    """apt's options for a private configuration under root/apt whose only source is
    `line` (deb or deb-src) of `mirror`'s `suite`, updated; and the hint for a failure.

    The machine's apt state is never read or written, only its mirror (when `mirror` is empty).
    """
    mirror = mirror.rstrip("/") or find_debian_mirror(read_apt_sources())
    if not KEYRING.is_file():
        raise ToolkitError(f"{KEYRING} is missing: cannot verify Debian's archive", INSTALL_HINT)
    log(f"default tree: downloading {package} ({suite}) from {mirror}")
    apt = root / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text(f"{line} [signed-by={KEYRING}] {mirror} {suite} main\n")
    options = [
        f"-o=Dir::Etc::sourcelist={sources}",
        "-o=Dir::Etc::sourceparts=-",
        f"-o=Dir::State::Lists={apt / 'lists'}",
        f"-o=Dir::Cache={apt / 'cache'}",
        "-o=Acquire::Languages=none",
    ]
    if os.geteuid() == 0:
        # apt would hand the download to its _apt user, who cannot write into root's home.
        options.append("-o=APT::Sandbox::User=root")
    hint = f"check that {mirror} is reachable and has {package} in {suite}, or {CONFIG_HINT}"
    run(["apt-get", "-q", *options, "update"], hint=hint, what=f"apt-get update ({suite})")
    return options, hint


def _download(
    root: Path, package: str, suite: str, mirror: str, log: Callable[[str], None]
) -> Path:
    """apt-get download `package` from `suite`, leaving the machine's apt state untouched."""
    options, hint = _private_apt(root, "deb", package, suite, mirror, log)
    partial = _fresh(root / ".download.partial")
    run(
        ["apt-get", "-q", *options, "download", package],
        cwd=partial,
        hint=hint,
        what=f"apt-get download {package}",
    )
    debs = sorted(partial.glob(f"{package}_*.deb"))
    if not debs:
        raise ToolkitError(f"apt-get download {package} left no .deb in {partial}", hint)
    deb = root / debs[-1].name
    os.replace(debs[-1], deb)
    shutil.rmtree(partial)
    return deb


# --- steps 2-4: extract the source and commit it ------------------------------------------------


def strip_debian_gitignore(text: str) -> str:
    """The top-level .gitignore without Debian's "ignore everything at the top level" stanza.

    Unchanged if the stanza is not there. Raises if a bare `/*` rule is left afterwards: that
    means Debian reworded the stanza, and the tree would silently ignore every new file.
    """
    stripped = DEBIAN_GITIGNORE_STANZA.sub("", text, count=1)
    if "/*" in stripped.splitlines():
        raise ToolkitError(
            "the source's top-level .gitignore still has a `/*` rule after removing Debian's "
            "stanza: the package changed its wording",
            "update DEBIAN_GITIGNORE_STANZA in kseries/tree.py to match the new text",
        )
    return stripped


def _import(
    root: Path,
    deb: Path,
    package: str,
    work: Path,
    timings: list[tuple[str, float]],
    log: Callable[[str], None],
) -> str:
    """Extract `deb` and commit its kernel source as the one commit of `work`'s master."""
    version = run(
        ["dpkg-deb", "-f", str(deb), "Version"],
        hint=f"{deb} looks damaged: delete it to download it again",
    ).strip()
    partial = _fresh(root / ".linux.partial")
    with _timed(timings, "extract"):
        log(f"default tree: extracting {deb.name}")
        unpacked = partial / "deb"
        run(
            ["dpkg-deb", "-x", str(deb), str(unpacked)],
            hint=f"check free space in {root}, or delete {deb} to download it again",
        )
        tarball = unpacked / "usr" / "src" / f"{package}.tar.xz"
        if not tarball.is_file():
            raise ToolkitError(
                f"{deb.name} has no usr/src/{tarball.name}",
                "is default_tree.package a linux-source-X.Y package?",
            )
        run(
            ["tar", "-xf", str(tarball), "--no-same-owner", "-C", str(partial)],
            hint=f"check free space in {root}",
        )
        date = _changelog_date(unpacked / "usr" / "share" / "doc" / package / "changelog.Debian.gz")
        shutil.rmtree(unpacked)
        source = partial / package
        if not (source / "Makefile").is_file():
            raise ToolkitError(
                f"{tarball.name} did not unpack to {package}/ with a Makefile",
                "is default_tree.package a linux-source-X.Y package?",
            )
    message = f"Linux {_kernel_version(source / 'Makefile')} (Debian {package} {version})"
    return _import_commit(partial, source, work, message, date, version, timings, log)


def _import_source(
    root: Path,
    package: str,
    suite: str,
    version: str,
    mirror: str,
    work: Path,
    timings: list[tuple[str, float]],
    log: Callable[[str], None],
) -> str:
    """apt-get source `package` (at `version`), unpacked by dpkg-source -x with Debian's
    patches applied (QEMU's offline build needs two of them), committed as `work`'s master."""
    dsc = _find_dsc(root, package, version)
    if dsc is None:
        with _timed(timings, "download"):
            dsc = _download_source(root, package, suite, version, mirror, log)
    partial = _fresh(root / f".{work.name}.partial")
    source = partial / package
    with _timed(timings, "unpack"):
        log(f"default tree: unpacking {dsc.name} with Debian's patches")
        run(
            ["dpkg-source", "--no-copy", "-x", str(dsc), str(source)],
            cwd=partial,
            hint=f"check free space in {root}, or delete {dsc.parent} to download it again",
            what=f"dpkg-source -x {dsc.name}",
        )
        # quilt's record of the applied patches: state of the unpacking, not source
        shutil.rmtree(source / ".pc", ignore_errors=True)
        if not (source / "debian" / "changelog").is_file():
            raise ToolkitError(
                f"{dsc.name} did not unpack to a Debian source tree",
                "is default_tree.package a source package?",
            )
    field = re.search(r"^Version: *(\S+)", dsc.read_text(errors="replace"), re.MULTILINE)
    full = field.group(1) if field else dsc.stem.split("_", 1)[-1]
    message = f"Debian source package {package} {full}, Debian's patches applied"
    date = _changelog_date(source / "debian" / "changelog")
    return _import_commit(partial, source, work, message, date, dsc.stem, timings, log)


def _import_commit(
    partial: Path,
    source: Path,
    work: Path,
    message: str,
    date: str,
    what: str,
    timings: list[tuple[str, float]],
    log: Callable[[str], None],
) -> str:
    """The unpacked `source` committed with the fixed identity and moved into place as
    `work`; the commit's sha, the same on every machine."""
    with _timed(timings, "git import"):
        log(f"default tree: importing the source as a git commit ({what})")
        gitignore = source / ".gitignore"
        if gitignore.is_file():
            gitignore.write_text(strip_debian_gitignore(gitignore.read_text()))
        base = _commit_tree(source, message, date)
        os.replace(source, work)
    shutil.rmtree(partial)
    return base


def _find_dsc(root: Path, package: str, version: str) -> Path | None:
    """The .dsc a finished download left in root/source (of `version`, if one is pinned)."""
    upstream = version.split(":", 1)[-1] if version else "*"
    found = sorted((root / "source").glob(f"{package}_{upstream}.dsc"))
    return found[-1] if found else None


def _download_source(
    root: Path, package: str, suite: str, version: str, mirror: str, log: Callable[[str], None]
) -> Path:
    """apt-get source --download-only through a deb-src line, published as root/source."""
    options, hint = _private_apt(root, "deb-src", package, suite, mirror, log)
    wanted = f"{package}={version}" if version else package
    partial = _fresh(root / ".source.partial")
    run(
        ["apt-get", "-q", *options, "source", "--download-only", wanted],
        cwd=partial,
        hint=hint,
        what=f"apt-get source {wanted}",
    )
    final = root / "source"
    if final.exists():  # a finished download of another version
        shutil.rmtree(final)
    os.replace(partial, final)
    dsc = _find_dsc(root, package, version)
    if dsc is None:
        raise ToolkitError(f"apt-get source {wanted} left no .dsc in {final}", hint)
    return dsc


def _commit_tree(source: Path, message: str, date: str) -> str:
    """git init + add + commit, reproducibly; checked so that no file was left out."""
    name, email = IDENTITY
    env = {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
        "GIT_COMMITTER_DATE": date,
    }
    git(source, "init", "-q", "-b", "master")
    # --force: Debian's .gitignore also dropped upstream's exceptions for dot-files (`.*` then
    # ignores all 400 .gitignore and the .kunitconfig files), and everything shipped is source.
    # bigFileThreshold=1 makes add stream every blob into one pack (no deltas, fast zlib) instead
    # of ~95k loose objects, which would make the user's first commit start an auto-gc that
    # repacks 1.3 GB for minutes; a full repack afterwards costs 30 s idle, 3 min on a busy box.
    git(source, "-c", "core.bigFileThreshold=1", "-c", "core.compression=1", "add", "-A", "-f")
    git(source, "commit", "-q", "--no-verify", "-m", message, env=env)
    git(source, "repack", "-d", "-q")  # the ~6k loose trees, into a second small pack
    base = git(source, "rev-parse", "HEAD").strip()
    git(source, "update-ref", "refs/kseries/base", base)
    _verify_import(source)
    return base


def _verify_import(source: Path) -> None:
    """Fail loudly rather than hand out a tree with files missing or the wrong branch."""
    if _try(["git", "cat-file", "-e", "HEAD:Makefile"], cwd=source)[0] != 0:
        raise ToolkitError(
            f"{source}: the import committed no Makefile",
            "the top-level .gitignore still ignores the source: see tree.py",
        )
    on_disk = 0
    for top, dirs, files in os.walk(source):
        if top == str(source):
            dirs.remove(".git")
        # os.walk lists a symlink to a directory among dirs, and git commits it as a link.
        on_disk += len(files) + sum(os.path.islink(os.path.join(top, d)) for d in dirs)
    committed = git(source, "ls-files", "-z").count("\0")
    if committed != on_disk:
        raise ToolkitError(
            f"{source}: committed {committed} of {on_disk} files",
            "some files were ignored or skipped: see tree.py",
        )
    status = git(source, "status", "--porcelain")
    head = git(source, "symbolic-ref", "HEAD").strip()
    if status or head != "refs/heads/master":
        raise ToolkitError(
            f"{source}: not a clean master after the import ({head})",
            status.splitlines()[0] if status else "",
        )


def _kernel_version(makefile: Path) -> str:
    """ "7.2.13" from VERSION, PATCHLEVEL, SUBLEVEL and EXTRAVERSION at the Makefile's top."""
    fields = dict(
        re.findall(
            r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION) *= *(\S*)",
            makefile.read_text(errors="replace"),
            re.MULTILINE,
        )
    )
    numbers = [fields.get(k, "") for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL")]
    return ".".join(n for n in numbers if n) + fields.get("EXTRAVERSION", "")


def _changelog_date(changelog: Path) -> str:
    """The date of the package's newest Debian changelog entry, as git's "epoch tz" date."""
    try:
        opener = gzip.open if changelog.suffix == ".gz" else open
        with opener(changelog, "rt", errors="replace") as f:
            for line in f:
                match = re.match(r"^ -- .*?>  (.+)$", line.rstrip("\n"))
                if match:
                    when = parsedate_to_datetime(match.group(1))
                    offset = when.utcoffset()
                    minutes = int(offset.total_seconds() // 60) if offset else 0
                    sign = "-" if minutes < 0 else "+"
                    hours, mins = divmod(abs(minutes), 60)
                    return f"{int(when.timestamp())} {sign}{hours:02d}{mins:02d}"
    except (OSError, ValueError, TypeError):
        pass
    return FALLBACK_DATE


# --- steps 5-6: the bare "kvm-x86" repository and the remote that points at it -----------------


def _make_bare(
    root: Path, work: Path, bare: Path, base: str, branch: str, log: Callable[[str], None]
) -> None:
    """A bare clone of `work` (hardlinked objects) whose only branch is `branch` at `base`."""
    if bare.is_dir():  # complete but lacking this branch: a call with another branch name
        git(bare, "update-ref", f"refs/heads/{branch}", base)
        return
    log(f"default tree: making {bare.name} with {branch} at {base[:12]}")
    partial = root / f".{bare.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    git(root, "clone", "-q", "--bare", str(work), str(partial))
    git(partial, "update-ref", f"refs/heads/{branch}", base)
    git(partial, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
    for ref in git(partial, "for-each-ref", "--format=%(refname)", "refs/heads").split():
        if ref != f"refs/heads/{branch}":
            git(partial, "update-ref", "-d", ref)
    git(partial, "remote", "remove", "origin")
    os.replace(partial, bare)


def _remote_is_current(work: Path, bare: Path, remote: str, branch: str, url: str) -> bool:
    """True when `remote` points at `bare` and its tracking ref matches `bare`'s branch."""
    status, out, _ = _try(["git", "config", "--get", f"remote.{remote}.url"], cwd=work)
    tracking = _rev(work, f"refs/remotes/{remote}/{branch}")
    return status == 0 and out.strip() == url and tracking == _rev(bare, f"refs/heads/{branch}")


def _add_remote(work: Path, remote: str, branch: str, url: str, log: Callable[[str], None]) -> None:
    log(f"default tree: adding remote {remote} and fetching {branch}")
    status, _, _ = _try(["git", "config", "--get", f"remote.{remote}.url"], cwd=work)
    git(work, "remote", "set-url" if status == 0 else "add", remote, url)
    git(work, "fetch", "-q", remote)


# --- helpers ------------------------------------------------------------------------------------


def run(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    hint: str = "",
    what: str = "",
) -> str:
    """Run `cmd` through the door (hermetic when it is git, see _try); its stdout."""
    return _run(cmd, cwd=cwd, env=env, hint=hint, what=what).stdout


def _try(
    cmd: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    done = _run(cmd, cwd=cwd, env=env, check=False)
    return done.status, done.stdout, done.stderr


def _run(
    cmd: Sequence[str],
    *,
    cwd: Path | None,
    env: Mapping[str, str] | None,
    check: bool = True,
    hint: str = "",
    what: str = "",
) -> Ran:
    full_env = {**os.environ, **(env or {})}
    if cmd and cmd[0] == "git":
        # Hermetic git: no user or system config (hooks, signing, autocrlf) can change the sha.
        full_env.update(
            GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0"
        )
        cmd = ["git", *GIT_CONFIG, *cmd[1:]]
    return door.run(
        cmd,
        cwd=cwd,
        env=full_env,
        check=check,
        what=what or " ".join(cmd[:2]),
        **({"hint": hint} if hint else {}),
    )


def git(cwd: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run git in `cwd` (hermetic, see _try); its stdout, or a ToolkitError."""
    words = [a for a in args if not a.startswith("-") and "=" not in a][:1]
    return run(
        ["git", *args],
        cwd=cwd,
        env=env,
        what=f"git {' '.join(words)} in {cwd}",
        hint="the disk may be full; otherwise run that git command there by hand",
    )


def _rev(repo: Path, ref: str) -> str | None:
    """The sha `ref` names in `repo`, or None (also when `repo` is not there)."""
    if not repo.is_dir():
        return None
    status, out, _ = _try(["git", "rev-parse", "-q", "--verify", f"{ref}^{{object}}"], cwd=repo)
    return out.strip() if status == 0 else None


def _fresh(path: Path) -> Path:
    """An empty directory at `path`, discarding what an interrupted run left there."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _check_free_space(root: Path) -> None:
    free = shutil.disk_usage(root).free
    if free < MIN_FREE_BYTES:
        raise ToolkitError(
            f"default tree: {free >> 20} MiB free in {root}, the import needs about "
            f"{MIN_FREE_BYTES >> 30} GiB",
            "free some space, or point XDG_CACHE_HOME at a bigger disk",
        )


@contextmanager
def _timed(timings: list[tuple[str, float]], name: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    timings.append((name, time.monotonic() - started))


if __name__ == "__main__":
    try:
        print(prepare_default_tree(log=lambda line: print(line, file=sys.stderr)).path)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
