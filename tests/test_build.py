"""`invoke build`: config fragments, the Kconfig check, real gcc builds of the 7.2 tree.

The slow tests build the embedded default tree for real: the main build goes to the same
per-tree directory under ~/.cache/kseries/build that `invoke build` uses, so a rerun is
incremental (cold: ~5 min on 2 cores). Tests that need a changed tree work in a throwaway
`git worktree` of the default tree, laid out like it (DIR/default-tree/linux, DIR/build/...),
so that ccache serves its first full build from the main build's results.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kseries import build
from kseries.build import STEP, BuildError, KconfigIndex, Manifest
from kseries.build.kconfig import _evaluate
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.paths import PROJECT, cache_dir
from kseries.testbox import kernel as testbox_kernel

MMU = "arch/x86/kvm/mmu/mmu.c"


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def config() -> Config:
    return Config.load(PROJECT / "configs")


def steps(log: str | Path) -> list[tuple[str, str]]:
    """kbuild's step lines of the make run a build log records."""
    return [
        (m.group(1), m.group(2)) for m in map(STEP.match, Path(log).read_text().split("\n")) if m
    ]


def compiled(log: str | Path) -> set[str]:
    return {path for kind, path in steps(log) if kind in ("CC", "AS") and path.endswith(".o")}


# --- options and inputs (fast) ------------------------------------------------------------------


def test_unknown_fragment_names_the_file_and_lists_the_known_ones(config: Config) -> None:
    with pytest.raises(ToolkitError) as e:
        build.build(config, fragments=["kvm-testbox", "no-such-fragment"], log=quiet)
    assert "no-such-fragment" in e.value.message
    assert str(config.directory / "no-such-fragment.config") in e.value.message
    assert "kvm-testbox" in e.value.hint


def test_bad_base_config(config: Config, tmp_path: Path) -> None:
    with pytest.raises(ToolkitError) as e:
        build.build(config, base_config="tinyconfg", log=quiet)
    assert "tinyconfg" in e.value.message and "tinyconfig" in e.value.hint
    not_a_config = tmp_path / "notes.txt"
    not_a_config.write_text("hello\n")
    with pytest.raises(ToolkitError) as e:
        build.build(config, base_config=str(not_a_config), log=quiet)
    assert str(not_a_config) in e.value.message and "not a kernel .config" in e.value.message


def test_fragment_with_a_bad_line_names_file_and_line(config: Config, tmp_path: Path) -> None:
    fragment = tmp_path / "bad.config"
    fragment.write_text("CONFIG_KVM=y\nKVM=y\n")
    with pytest.raises(ToolkitError) as e:
        build.build(config, fragments=[str(fragment)], log=quiet)
    assert f"{fragment}:2" in e.value.message


def test_unknown_target(config: Config) -> None:
    with pytest.raises(ToolkitError) as e:
        build.build(config, target="vmlinuz", log=quiet)
    assert "'vmlinuz'" in e.value.message and "bzImage" in e.value.hint


def test_tree_that_is_not_a_kernel_tree(config: Config, tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "README").write_text("not linux\n")
    with pytest.raises(ToolkitError) as e:
        build.build(config, tree=str(tmp_path), log=quiet)
    assert f"tree {tmp_path} is not a kernel tree" in e.value.message
    with pytest.raises(ToolkitError) as e:
        build.build(config, tree=str(tmp_path / "missing"), log=quiet)
    assert "does not exist" in e.value.message


def test_missing_tool_is_named_before_make_runs(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real PATH without flex (the machine has it installed, so it is hidden, not mocked).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "gcc", "bison", "bc", "git", "ccache"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(ToolkitError) as e:
        build.build(config, log=quiet)
    assert e.value.message.startswith("flex is not installed")
    assert "apt-get install flex" in e.value.hint


def test_invoke_task_prints_one_error_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(PROJECT / ".venv/bin/invoke"), "build", "--config", "nope"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[0].startswith("error: config fragment 'nope'")
    assert done.stderr.splitlines()[1].startswith("hint: fragments in")


# --- pure pieces: failure summaries, distcc slots, Kconfig expressions, the manifest ------------
# The failure texts below are lines as gcc, ld and make print them (captured from real runs);
# the classifier is a function of the log, so it is tested on text.


def failure(lines: list[str], tree: Path = Path("/src/linux")) -> ToolkitError:
    target = build.Target("bzImage", ("bzImage",))
    return build.failure(lines, 2, Path("/b/kseries/build.log"), tree, Path("/b"), target)


def test_compiles_are_counted_from_kbuild_ninja_and_gcc_lines() -> None:
    """`invoke check` shows how many objects a commit recompiled, whoever printed them."""
    from kseries.build.failure import output

    printed = [
        "  CC      arch/x86/kvm/mmu/mmu.o",
        "[1/5] Generating qemu-version.h with a custom command",
        "[2/3] Compiling C object libqemu-x86_64-softmmu.a.p/target_i386_svm_helper.c.o",
        "[3/3] Linking target qemu-system-x86_64",
        "gcc -O2 -c -o x86/memory_fault_exit_test.o x86/memory_fault_exit_test.c",
    ]
    assert output(printed) == ((), 3)


def test_failure_summary_compile_error_relative_to_the_build_dir() -> None:
    error = failure(
        [
            "  CC      arch/x86/kvm/mmu/mmu.o",
            "../src/linux/arch/x86/kvm/mmu/mmu.c:7400:24: error: expected expression before ';' "
            "token",
            " 7400 | int kseries_broken = ;",
            "      |                        ^",
            "make[4]: *** [/src/linux/scripts/Makefile.build:287: arch/x86/kvm/mmu/mmu.o] Error 1",
        ]
    )
    assert isinstance(error, BuildError)
    assert error.file == MMU and error.line == 7400
    assert error.message == (f"compile error at {MMU}:7400: expected expression before ';' token")
    assert "make exited 2" in error.hint and "/b/kseries/build.log" in error.hint
    assert error.context[0] == " 7400 | int kseries_broken = ;"


def test_failure_summary_link_error() -> None:
    error = failure(
        [
            "  LD      vmlinux.o",
            "ld: vmlinux.o: in function `kvm_mmu_page_fault':",
            "/src/linux/arch/x86/kvm/mmu/mmu.c:6230:(.text+0x5c1e): undefined reference to "
            "`kseries_missing'",
        ]
    )
    assert isinstance(error, BuildError)
    assert error.message == f"link error at {MMU}:6230: undefined reference to `kseries_missing'"


@pytest.mark.parametrize(
    ("line", "what", "package"),
    [
        ("/bin/sh: 1: flex: not found", "flex", "flex"),
        ("/bin/sh: 1: bison: not found", "bison", "bison"),
        ("/bin/sh: 1: bc: not found", "bc", "bc"),
        ("/bin/sh: 1: rsync: not found", "rsync", "rsync"),
        (
            "tools/objtool/include/objtool/elf.h:10:10: fatal error: gelf.h: No such file or "
            "directory",
            "libelf headers",
            "libelf-dev",
        ),
        (
            "certs/extract-cert.c:21:10: fatal error: openssl/bio.h: No such file or directory",
            "OpenSSL headers",
            "libssl-dev",
        ),
    ],
)
def test_failure_summary_missing_toolchain_piece(line: str, what: str, package: str) -> None:
    error = failure(["  HOSTCC  scripts/kconfig/lexer.lex.o", line, "make[2]: *** Error 127"])
    assert error.message.startswith(f"{what} missing")
    assert f"apt-get install {package}" in error.hint


def test_failure_summary_source_tree_not_clean() -> None:
    error = failure(["***", "*** The source tree is not clean, please run 'make mrproper'"])
    assert "mrproper" in error.hint


def run_make(tmp_path: Path, recipe: list[str], **options: Any) -> build.Outcome:
    """A real make run of a small Makefile that prints what kbuild prints."""
    tree = tmp_path / "src"
    tree.mkdir()
    (tree / "Makefile").write_text("all:\n" + "".join(f"\t@{line}\n" for line in recipe))
    with (tmp_path / "build.log").open("w") as log_file:
        target = build.Target("all", ("all",))
        runner = build.MakeRun(tree, tmp_path / "out", target, jobs=1, log_file=log_file, **options)
        return runner.run()


def test_build_streams_with_verbose_and_counts_steps(tmp_path: Path) -> None:
    screen = StringIO()
    outcome = run_make(
        tmp_path,
        ["echo '  CC      init/main.o'", "echo '  LD      vmlinux'", "echo 'plain line'"],
        verbose=True,
        console=Console(file=screen, width=200),
    )
    assert outcome.steps == (("CC", "init/main.o"), ("LD", "vmlinux"))
    assert "  CC      init/main.o\n" in screen.getvalue() and "plain line" in screen.getvalue()
    assert "plain line" in (tmp_path / "build.log").read_text()


def test_build_failure_from_a_real_make_run(tmp_path: Path) -> None:
    with pytest.raises(BuildError) as e:
        run_make(
            tmp_path,
            ["echo '  CC      x.o'", "echo 'x.c:3:1: error: boom' >&2", "exit 2"],
            console=Console(file=StringIO()),
        )
    assert (e.value.file, e.value.line) == ("x.c", 3)
    assert "make exited 2" in e.value.hint and str(tmp_path / "build.log") in e.value.hint


def test_ccache_hit_rate_leaves_out_compiler_probes(tmp_path: Path) -> None:
    # The format of ccache's stats_log (ccache 4.7): "# FILE", then that call's counters.
    log = tmp_path / "stats.log"
    log.write_text(
        "# /dev/null\ncache_miss\ndirect_cache_miss\n"
        "# ../../default-tree/linux/kernel/fork.c\ndirect_cache_hit\nlocal_storage_hit\n"
        "# ../../default-tree/linux/kernel/exit.c\npreprocessed_cache_hit\n"
        "# ../../default-tree/linux/arch/x86/kvm/mmu/mmu.c\ncache_miss\ndirect_cache_miss\n"
        "# \nno_input_file\n"
    )
    assert build.ccache_stats(log) == {"hits": 2, "misses": 1, "hit_rate": 0.6667}


def test_distcc_jobs_follow_the_hosts() -> None:
    assert build.distcc_jobs("10.0.0.5/8 10.0.0.6/8") == 16
    assert build.distcc_jobs("127.0.0.1:3632/2") == 2
    assert build.distcc_jobs("buildbox localhost --randomize") == 4 + 2


def test_kconfig_index_names_the_dependency(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "Kconfig").write_text(
        'mainmenu "t"\nconfig A\n\tbool "A"\n\thelp\n\t  if this were parsed, it would break\n'
        '\n\t  config HELPTEXT\nsource "sub/Kconfig"\n'
    )
    (tmp_path / "sub/Kconfig").write_text(
        'menuconfig VIRT\n\tbool "v"\nif VIRT\nconfig KVM\n\ttristate "kvm"\n'
        "\tdepends on A && (B || !C) # a comment\n\tselect HIDDEN\nendif\n"
        'config HIDDEN\n\tbool\nchoice\n\tprompt "pick"\nconfig P1\n\tbool "1"\n'
        'config P2\n\tbool "2"\nendchoice\n'
    )
    index = KconfigIndex(tmp_path)
    assert "HELPTEXT" not in index.definitions
    reason = index.why("KVM", "y", {"CONFIG_A": "y"})
    assert reason.text.startswith("unmet dependency VIRT (VIRT=n; `if VIRT` at sub/Kconfig:3)")
    assert reason.hint == "add CONFIG_VIRT=y to the fragment"
    reason = index.why("KVM", "y", {"CONFIG_VIRT": "y", "CONFIG_C": "y"})
    assert "unmet dependency A && (B || !C) (A=n, B=n, C=y" in reason.text
    assert "HIDDEN has no prompt" in index.why("HIDDEN", "y", {"CONFIG_VIRT": "y"}).text
    assert "KVM" in index.why("HIDDEN", "y", {}).text
    assert "picked P1" in index.why("P2", "y", {"CONFIG_P1": "y"}).text
    assert "no config NOPE" in index.why("NOPE", "y", {}).text
    assert index.why("HIDDEN", "n", {"CONFIG_KVM": "y"}).text == "selected by KVM"


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("A && B", 1),
        ("A || !B", 2),
        ("!(A && C)", 2),
        ('S = "x86"', 2),
        ("N >= 16", 2),
        ("N < 0x10", 0),
        ("A != y", 0),
        ("$(cc-option,-mfoo) && A", 2),
    ],
)
def test_kconfig_expressions(expr: str, value: int) -> None:
    values = {"A": "y", "B": "m", "S": '"x86"', "N": "16"}
    assert _evaluate(expr, values) == value


def test_manifest_round_trip(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(b"kernel")
    manifest = Manifest(
        tree="/t",
        branch="demo-v2",
        commit="a" * 40,
        dirty=False,
        kernelrelease="7.2.13+",
        utsversion="#1 SMP",
        target="bzImage",
        image=build.FileId.of(image),
        config=build.FileId.of(image),
        base_config="tinyconfig",
        fragments=[{"name": "kvm-testbox", "path": "/p", "sha256": "b" * 64}],
        wall_time_s=1.5,
        ccache={"hits": 1, "misses": 1, "hit_rate": 0.5},
        distcc_hosts="",
        jobs=2,
        build_dir="/b",
        log="/b/kseries/build.log",
        built_at="2026-11-26T00:00:00+00:00",
    )
    written = manifest.write(tmp_path / "manifest.json")
    assert Manifest.load(tmp_path / "manifest.json") == written
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["image"]["sha256"] == build.sha256_file(image)
    assert "path" not in data
    # a manifest written before the meson kind called its artifact "bzimage"
    data["bzimage"] = data.pop("image")
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Manifest.load(tmp_path / "old.json").image == written.image


# --- real builds of the default tree (slow) -----------------------------------------------------


@pytest.fixture(scope="module")
def default_build(config: Config) -> Manifest:
    """The test-box kernel of the default tree, in `invoke build`'s own build directory."""
    return build.build(config, log=print)


@pytest.mark.slow
def test_real_build_of_the_default_tree(default_build: Manifest, config: Config) -> None:
    m = default_build
    tree = Path(m.tree)
    assert tree == (cache_dir() / "default-tree" / "linux").resolve()
    assert Path(m.build_dir) == build.default_build_dir(tree)
    image = Path(m.build_dir) / "arch/x86/boot/bzImage"
    assert m.image is not None and m.image.path == str(image)
    assert m.image.sha256 == build.sha256_file(image) and m.image.size > 1 << 20
    assert m.path == str(image.parent / "manifest.json")
    assert Manifest.load(Path(m.path)) == m
    # the test-box stage reads the same file through its own reader: the two must agree
    facts = testbox_kernel.read_manifest(Path(m.path))
    assert facts["bzimage"].name == "bzImage" and facts["kernelrelease"] == m.kernelrelease
    assert facts["utsversion"] == m.utsversion
    assert (
        m.commit
        == subprocess.run(
            ["git", "-C", m.tree, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    assert m.kernelrelease.startswith("7.2.13")
    uts = (Path(m.build_dir) / "include/generated/utsversion.h").read_text()
    assert f'"{m.utsversion}"' in uts and m.utsversion.startswith("#")
    assert m.config.sha256 == build.sha256_file(Path(m.build_dir) / ".config")
    names = config.table("build")["fragments"]
    assert [f["name"] for f in m.fragments] == names
    assert names[0] == "kvm-testbox" and "vfio-edu" in names
    assert m.base_config == "tinyconfig"
    final = build.read_config(Path(m.build_dir) / ".config")
    for name in names:
        fragment = build.Fragment.load(name, config.directory)
        assert {k: final.get(k) for k in fragment.options} == fragment.options
    if shutil.which("ccache"):
        assert m.ccache is not None and 0 <= m.ccache["hit_rate"] <= 1
    last = json.loads((cache_dir() / "build" / "last.json").read_text())
    assert last["manifest"] == m.path and build.last_build() == m
    print(f"default tree: {m.wall_time_s:.1f}s, ccache {m.ccache}")


@pytest.mark.slow
def test_invoke_build_again_rebuilds_nothing(default_build: Manifest) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [str(PROJECT / ".venv/bin/invoke"), "build"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"built {default_build.image.path}" in done.stdout
    assert "7.2.13" in done.stdout and "manifest" in done.stdout
    assert compiled(Path(default_build.build_dir) / "kseries/build.log") == set()
    assert "configuring" not in done.stdout  # the .config was kept, so nothing is re-synced
    print(f"no-op invoke build: {time.monotonic() - started:.1f}s")


@pytest.mark.slow
def test_dropped_option_names_the_option_and_its_dependency(
    default_build: Manifest, config: Config, tmp_path: Path
) -> None:
    fragment = tmp_path / "kvm-without-virtualization.config"
    fragment.write_text("CONFIG_TTY=y\nCONFIG_KVM=y\n")
    with pytest.raises(ToolkitError) as e:
        build.build(config, fragments=[str(fragment)], out=str(tmp_path / "out"), log=quiet)
    message = e.value.message
    assert message.startswith(f"{fragment}:2 asks for CONFIG_KVM=y, but Kconfig dropped it")
    assert "unmet dependency VIRTUALIZATION (VIRTUALIZATION=n; `if VIRTUALIZATION` at " in message
    assert "arch/x86/kvm/Kconfig" in message
    assert e.value.hint == "add CONFIG_VIRTUALIZATION=y to the fragment"


@pytest.fixture(scope="module")
def worktree(default_build: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A throwaway worktree of the default tree at the commit the main build built."""
    root = tmp_path_factory.mktemp("worktree")
    path = root / "default-tree" / "linux"
    path.parent.mkdir(parents=True)
    git = ["git", "-C", default_build.tree]
    subprocess.run(
        [*git, "worktree", "add", "-q", "--detach", str(path), default_build.commit], check=True
    )
    yield path
    shutil.rmtree(root, ignore_errors=True)  # the worktree and its build directory, ~2 GB
    subprocess.run([*git, "worktree", "prune"], check=False)


@pytest.fixture(scope="module")
def worktree_build(worktree: Path, config: Config) -> Manifest:
    """A full build of the worktree (ccache hits from the main build keep it short)."""
    out = worktree.parent.parent / "build" / "linux-worktree"
    return build.build(config, tree=str(worktree), out=str(out), log=print, set_last=False)


@pytest.mark.slow
def test_incremental_rebuild_after_touching_one_file(
    worktree: Path, worktree_build: Manifest, config: Config
) -> None:
    before = worktree_build
    os.utime(worktree / MMU)
    screen = StringIO()
    after = build.build(
        config,
        tree=str(worktree),
        out=before.build_dir,
        log=print,
        console=Console(file=screen, force_terminal=True, width=120),
        set_last=False,
    )
    rebuilt = compiled(after.log)
    # The final images: vmlinux (whose link compiles the version stamp and, with KALLSYMS, the
    # .tmp_vmlinuxN.kallsyms tables) and bzImage.
    outside_images = {
        p
        for p in rebuilt
        if not p.startswith(("arch/x86/boot/", ".tmp_vmlinux")) and p != "init/version-timestamp.o"
    }
    assert outside_images == {"arch/x86/kvm/mmu/mmu.o"}, rebuilt
    made = steps(after.log)
    assert ("LD", "vmlinux.o") in made and ("BUILD", "arch/x86/boot/bzImage") in made
    assert after.commit == before.commit
    assert after.utsversion != before.utsversion
    assert after.image.sha256 != before.image.sha256
    assert "make bzImage" in screen.getvalue()  # the progress display was drawn
    print(
        f"worktree: full {before.wall_time_s:.1f}s (ccache {before.ccache}), "
        f"incremental {after.wall_time_s:.1f}s"
    )


@pytest.mark.slow
def test_compile_error_names_file_and_line(
    worktree: Path, worktree_build: Manifest, config: Config
) -> None:
    source = worktree / MMU
    original = source.read_bytes()
    broken_line = original.count(b"\n") + 1
    source.write_bytes(original + b"int kseries_broken = ;\n")
    lines: list[str] = []
    try:
        with pytest.raises(BuildError) as e:
            build.build(
                config,
                tree=str(worktree),
                out=worktree_build.build_dir,
                target="arch/x86/kvm/mmu/mmu.o",
                log=lines.append,
            )
    finally:
        source.write_bytes(original)
    error = e.value
    assert (error.file, error.line) == (MMU, broken_line)
    assert error.message.startswith(f"compile error at {MMU}:{broken_line}: expected expression")
    assert error.exit_code != 0
    assert f"full log: {worktree_build.build_dir}/kseries/build.log" in error.hint
    assert any("kseries_broken" in line for line in lines)  # the context lines were shown


@pytest.mark.slow
def test_kconfig_failure_names_the_kconfig_file(
    worktree: Path, worktree_build: Manifest, config: Config
) -> None:
    kconfig = worktree / "arch/x86/kvm/Kconfig"
    original = kconfig.read_bytes()
    kconfig.write_bytes(original + b'config KSERIES_BROKEN\n\tbool "unterminated\n\tdepends on (\n')
    try:
        with pytest.raises(ToolkitError) as e:
            # Another base config makes the build reconfigure, so Kconfig reads the tree.
            build.build(
                config,
                tree=str(worktree),
                out=worktree_build.build_dir,
                base_config="defconfig",
                log=quiet,
                set_last=False,
            )
    finally:
        kconfig.write_bytes(original)
    assert e.value.message.startswith("Kconfig failed in make defconfig")
    assert "arch/x86/kvm/Kconfig:" in e.value.message
    assert "kseries/build.log" in e.value.hint


@pytest.fixture
def distccd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A distccd on 127.0.0.1, a free port, serving 127.0.0.1 only; stopped by its PID."""
    if not shutil.which("distccd"):
        pytest.fail("distccd is not installed: run `bash ci/install.sh`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # distccd drops root for the `distcc` user, which must be able to write its log.
    log_dir = Path(tempfile.mkdtemp(prefix="distccd-"))
    log_dir.chmod(0o777)
    log = log_dir / "distccd.log"
    log.touch(mode=0o666)
    log.chmod(0o666)
    daemon = subprocess.Popen(
        [
            "distccd",
            "--no-detach",
            "--daemon",
            "--listen",
            "127.0.0.1",
            "--allow",
            "127.0.0.1",
            "--port",
            str(port),
            "--jobs",
            "2",
            "--log-file",
            str(log),
            "--log-level",
            "info",
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert daemon.poll() is None, f"distccd exited: {log.read_text()}"
                assert time.monotonic() < deadline, "distccd did not listen"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}/2", log
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=10)
        shutil.rmtree(log_dir, ignore_errors=True)


@pytest.mark.slow
def test_distcc_compiles_through_distccd(
    worktree: Path, worktree_build: Manifest, config: Config, distccd: tuple[str, Path]
) -> None:
    hosts, log = distccd
    manifest = build.build(
        config,
        tree=str(worktree),
        out=worktree_build.build_dir,
        target="arch/x86/kvm/mmu/mmu.o",
        distcc=hosts,
        log=print,
    )
    assert "arch/x86/kvm/mmu/mmu.o" in compiled(manifest.log)
    assert manifest.distcc_hosts == hosts and manifest.jobs == max(os.cpu_count() or 1, 2)
    served = [line for line in log.read_text().splitlines() if "COMPILE_OK" in line]
    assert any("mmu.c" in line for line in served), log.read_text()[-2000:]
    assert "CC=distcc gcc" in Path(manifest.log).read_text()
