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
import tempfile
from pathlib import Path

from common import PROJECT, timed

from kseries import series as series_stage
from kseries.changelog import Changelog
from kseries.config import Config
from kseries.rebase import mbox
from kseries.tree import scratch_clone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds

    series = series_stage.load(Config.load())
    with tempfile.TemporaryDirectory(prefix="kseries-bench-") as scratch:
        clone = scratch_clone(Path(scratch) / "linux", remote=series.base.remote)
        base = f"{series.base.remote}/{series.base.branch}"
        series_mbox = Path(scratch) / "series.mbox"
        series_mbox.write_text(mbox(series, Changelog(series).messages()))
        env = {**os.environ, **series.committer_env}
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
