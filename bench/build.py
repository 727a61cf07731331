"""bench/build: `invoke build` against plain make, on the same tree and build directory.

    .venv/bin/python bench/build.py [--rounds N] [--keep]

In one run, in a throwaway worktree of the default tree (at its HEAD), with a private, empty
ccache and build directory, so that "cold" is really cold:

(a) `invoke build` after a one-line change to arch/x86/kvm/mmu/mmu.c, against plain
    `make -j2 bzImage` after the same kind of change (each round changes the line to a new
    text, so neither run gets a ccache hit for mmu.c). Target: at most 1.1x.
(b) that incremental `invoke build` against the cold full `invoke build`.
(c) a full `invoke build` after `make clean` with ccache warm, against the cold one.

Plain make gets the same make variables and environment the toolkit gives it (CC="ccache gcc",
LC_ALL=C, CCACHE_BASEDIR): a different CC would make kbuild rebuild everything, which would
measure a config change instead of the toolkit. XDG_CACHE_HOME points at the scratch
directory, so the user's last-build pointer is left alone. Times are wall clock, single
machine, and as noisy as the machine is busy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from kseries import tree as tree_stage  # noqa: E402
from kseries.build import STEP  # noqa: E402

MMU = "arch/x86/kvm/mmu/mmu.c"
JOBS = 2


def run(cmd: list[str], env: dict[str, str], cwd: Path = PROJECT) -> float:
    """Run `cmd` to completion; its wall time. Output goes to a log, shown on failure."""
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    compiled = sum(
        1 for line in done.stdout.splitlines() if (m := STEP.match(line)) and m.group(1) == "CC"
    )
    if compiled:
        print(f"    ({compiled} CC steps)", flush=True)
    return seconds


def change(source: Path, original: str, tag: str) -> None:
    """A one-line change that really recompiles: a new declaration at the end of the file.

    (A changed comment would not do: ccache's preprocessor mode would serve the old object.)
    """
    source.write_text(original + f"static int __maybe_unused kseries_bench_{tag};\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="incremental rounds (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    default = tree_stage.prepare_default_tree(log=print).path
    scratch = Path(tempfile.mkdtemp(prefix="kseries-bench-build-"))
    tree, out, ccache = scratch / "linux", scratch / "out", scratch / "ccache"
    env = {**os.environ, "XDG_CACHE_HOME": str(scratch / "cache"), "CCACHE_DIR": str(ccache)}
    env.pop("CCACHE_BASEDIR", None)
    invoke = [
        str(PROJECT / ".venv/bin/invoke"),
        "build",
        "--tree",
        str(tree),
        "--out",
        str(out),
        "--jobs",
        str(JOBS),
    ]
    # What the toolkit passes to make (kseries.build): the same for the plain make runs.
    make = ["make", "-C", str(tree), f"O={out}", f"-j{JOBS}", "CC=ccache gcc", "bzImage"]
    make_env = {
        **env,
        "LC_ALL": "C",
        "LANG": "C",
        "CCACHE_BASEDIR": os.path.commonpath([tree, out]),
    }
    print(f"bench: scratch {scratch}; load average {os.getloadavg()[0]:.1f}", flush=True)
    subprocess.run(
        ["git", "-C", str(default), "worktree", "add", "-q", "--detach", str(tree), "HEAD"],
        check=True,
    )
    try:
        source = tree / MMU
        original = source.read_text()

        print("cold full build (invoke build, empty ccache) ...", flush=True)
        cold = run(invoke, env)
        print(f"  {cold:.1f}s", flush=True)

        ours, plain = [], []
        for n in range(args.rounds):
            change(source, original, f"toolkit_{n}")
            print(f"round {n}: invoke build after a one-line change ...", flush=True)
            ours.append(run(invoke, env))
            print(f"  {ours[-1]:.1f}s", flush=True)
            change(source, original, f"make_{n}")
            print(f"round {n}: make -j{JOBS} bzImage after a one-line change ...", flush=True)
            plain.append(run(make, make_env))
            print(f"  {plain[-1]:.1f}s", flush=True)

        source.write_text(original)
        subprocess.run(
            ["make", "-s", "-C", str(tree), f"O={out}", "clean"],
            env=make_env,
            check=True,
            capture_output=True,
        )
        print("full build after make clean, ccache warm (invoke build) ...", flush=True)
        warm = run(invoke, env)
        print(f"  {warm:.1f}s", flush=True)
    finally:
        subprocess.run(
            ["git", "-C", str(default), "worktree", "remove", "--force", str(tree)], check=False
        )
        subprocess.run(["git", "-C", str(default), "worktree", "prune"], check=False)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    incremental, make_incremental = statistics.median(ours), statistics.median(plain)
    print()
    print(f"cold full build        {cold:7.1f}s")
    print(f"warm full build        {warm:7.1f}s   (ccache warm, after make clean)")
    for name, median, runs in (("toolkit", incremental, ours), ("make", make_incremental, plain)):
        each = ", ".join(f"{s:.1f}" for s in runs)
        print(f"incremental, {name:9}{median:7.1f}s   (median of {each})")
    print()
    overhead = incremental / make_incremental
    verdict = "ok" if overhead <= 1.1 else "OVER TARGET"
    print(f"(a) invoke build / make, incremental: {overhead:.2f}x  (target <= 1.1x: {verdict})")
    print(f"(b) incremental / cold full build:    {incremental / cold:.3f}x")
    print(f"(c) warm-ccache full / cold full:     {warm / cold:.2f}x")
    print(
        f"load average now {os.getloadavg()[0]:.1f} (2 cores: above 2 means the times are "
        "inflated by other work)"
    )


if __name__ == "__main__":
    main()
