"""bench/rebase: `invoke rebase --no-fetch` against plain `git am -3`, side by side, on 7.2.

Both run in the same shared clone of the embedded default tree, alternating, several rounds:
  toolkit: `invoke rebase --no-fetch --tree CLONE` (a fresh branch each round, as on a first
           run, and a re-run that keeps the previous attempt and prints the range-diff)
  plain:   `git checkout -B plain BASE && git am -3 --keep SERIES.mbox` (same mbox)
It prints the medians and the ratios; the target is at most 1.5x.
Run: .venv/bin/python bench/rebase.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from kseries import series as series_stage  # noqa: E402
from kseries.changelog import Changelog  # noqa: E402
from kseries.config import Config  # noqa: E402
from kseries.rebase import committer_env, mbox  # noqa: E402
from kseries.tree import prepare_default_tree  # noqa: E402


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds

    default = prepare_default_tree(log=lambda _: None)
    series = series_stage.load(Config.load())
    with tempfile.TemporaryDirectory(prefix="kseries-bench-") as scratch:
        clone = Path(scratch) / "linux"
        subprocess.run(
            [
                "git",
                "clone",
                "-q",
                "--shared",
                "-o",
                series.base.remote,
                default.remote_url,
                str(clone),
            ],
            check=True,
        )
        subprocess.run(["git", "checkout", "-q", "-b", "master"], cwd=clone, check=True)
        base = f"{series.base.remote}/{series.base.branch}"
        series_mbox = Path(scratch) / "series.mbox"
        series_mbox.write_text(mbox(series, Changelog(series).messages()))
        env = {**os.environ, **committer_env(series)}
        invoke = [
            str(PROJECT / ".venv/bin/invoke"),
            "-r",
            str(PROJECT),
            "rebase",
            "--no-fetch",
            "--tree",
            str(clone),
        ]
        fresh, rerun, plain = [], [], []
        for _ in range(rounds):
            subprocess.run(["git", "checkout", "-q", "master"], cwd=clone, check=True)
            subprocess.run(
                ["git", "branch", "-q", "-D", series.branch], cwd=clone, capture_output=True
            )
            subprocess.run(
                "git for-each-ref --format='delete %(refname)' refs/kseries/ | "
                "git update-ref --stdin",
                shell=True,
                cwd=clone,
                check=True,
            )
            fresh.append(timed(invoke, PROJECT))
            rerun.append(timed(invoke, PROJECT))
            subprocess.run(["git", "checkout", "-q", "master"], cwd=clone, check=True)
            plain.append(
                timed(
                    [
                        "sh",
                        "-c",
                        f"git checkout -q -B plain {base} && git am -q -3 --keep {series_mbox}",
                    ],
                    clone,
                    env,
                )
            )
        fresh_s, rerun_s, plain_s = (statistics.median(x) for x in (fresh, rerun, plain))
    print(f"rounds: {rounds}, patches: {len(series.patches)}, tree: Linux 7.2.13")
    print(f"plain git checkout -B + git am -3: {plain_s:.3f} s (median)")
    print(f"invoke rebase --no-fetch (fresh):  {fresh_s:.3f} s  ratio {fresh_s / plain_s:.2f}x")
    print(f"invoke rebase --no-fetch (re-run): {rerun_s:.3f} s  ratio {rerun_s / plain_s:.2f}x")
    print("target: at most 1.50x")


if __name__ == "__main__":
    main()
