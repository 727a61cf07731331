"""bench/send: `invoke send-series --dry-run` against raw git, side by side, on the 7.2 tree.

In one shared clone of the embedded default tree with the series rebased onto it:
  toolkit: `invoke send-series --tree CLONE --out DIR` (format-patch, get_maintainer.pl,
           every pre-send check including checkpatch --strict, send-email --dry-run)
  raw git: `git format-patch -v2 --cover-letter --base=... -o DIR` + `git send-email --dry-run`
  raw git + checks: the same with what the toolkit checks done by hand in between, as a kernel
           developer's script would: `checkpatch.pl --strict` and `get_maintainer.pl` on each
           patch
  b4:      `b4 send --dry-run` on a b4 prep branch of the same commits, when b4 is installed
           (`pip install -e '.[bench]'`) and can enroll the branch offline; skipped with the
           reason if not.
Cold is the first toolkit run (checkpatch and get_maintainer caches empty); warm is every run
after, the usual case when iterating. Prints medians and ratios; target: at most 1.5x raw git.
Run: .venv/bin/python bench/send.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import PROJECT, timed

from kseries import series as series_stage
from kseries.config import Config
from kseries.gitrepo import WorkTree
from kseries.rebase import Rebase
from kseries.tree import scratch_clone


def b4_time(clone: Path, base: str, branch: str, env: dict[str, str]) -> str:
    """b4 send --dry-run on a prep branch of the same commits, or why it could not run."""
    b4 = shutil.which("b4") or str(PROJECT / ".venv/bin/b4")
    if not Path(b4).exists():
        return "b4 not installed (.venv/bin/pip install -e '.[bench]'): skipped"
    enroll = subprocess.run(
        [b4, "prep", "-n", "b4-bench", "-f", base],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
    )
    if enroll.returncode != 0:
        return f"b4 prep could not enroll offline: {enroll.stderr.strip()[-200:]}"
    subprocess.run(
        ["git", "cherry-pick", f"{base}..{branch}"],
        cwd=clone,
        env=env,
        check=True,
        capture_output=True,
    )
    command = [b4, "send", "--dry-run", "--no-sign"]
    trial = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
    if trial.returncode != 0:
        return f"b4 send --dry-run failed offline: {trial.stderr.strip()[-300:]}"
    runs = [timed(command, clone, env) for _ in range(3)]
    return f"{statistics.median(runs):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds

    series = series_stage.load(Config.load())
    with tempfile.TemporaryDirectory(prefix="kseries-bench-send-") as scratch:
        clone = scratch_clone(Path(scratch) / "linux", remote=series.base.remote)
        tree = WorkTree(clone)
        Rebase(tree, series, log=lambda _: None).start(
            remote=series.base.remote, branch=series.base.branch
        )
        base = tree.git("merge-base", series.branch, series.base.tracking_ref).strip()
        who = series.submitter
        env = {
            **os.environ,
            **series.committer_env,
            "GIT_CONFIG_COUNT": "3",
            "GIT_CONFIG_KEY_0": "user.name",
            "GIT_CONFIG_VALUE_0": who.name,
            "GIT_CONFIG_KEY_1": "user.email",
            "GIT_CONFIG_VALUE_1": who.email,
            # b4 sends through its web endpoint unless git has an SMTP server; a dry run never
            # connects, so a loopback address lets b4 run offline
            "GIT_CONFIG_KEY_2": "sendemail.smtpServer",
            "GIT_CONFIG_VALUE_2": "127.0.0.1",
        }
        invoke = [
            str(PROJECT / ".venv/bin/invoke"),
            "-r",
            str(PROJECT),
            "send-series",
            "--untested",  # the clone has no test report: raw git has no Testing section
            "--tree",
            str(clone),
            "--out",
            f"{scratch}/toolkit",
        ]
        to = " ".join(f"--to='{p.ident}'" for p in (series.people["sean"], series.people["paolo"]))
        raw = [
            "sh",
            "-c",
            f"rm -rf {scratch}/raw && git format-patch -q -v{series.version} --cover-letter "
            "--cover-from-description=subject "
            f"--base={base} --thread -o {scratch}/raw {base}..{series.branch} && "
            f"git send-email --dry-run --confirm=never {to} --to=kvm@vger.kernel.org "
            f"--from='{series.submitter.ident}' {scratch}/raw/*.patch",
        ]
        ignore = ",".join(Config.load().table("send").get("checkpatch_ignore", {}))
        checked = [
            "sh",
            "-c",
            raw[2].replace(
                " && git send-email",
                f" && for p in {scratch}/raw/v*-000[1-9]-*.patch; do "
                f"PATH=/usr/bin:$PATH perl scripts/checkpatch.pl --strict --ignore {ignore} "
                "--no-summary-file --color=never $p >/dev/null && "
                "perl scripts/get_maintainer.pl --nogit --nogit-fallback $p >/dev/null; done"
                " && git send-email",
            ),
        ]
        cold = timed(invoke, PROJECT)
        toolkit, plain, startup, by_hand = [], [], [], []
        for _ in range(rounds):
            toolkit.append(timed(invoke, PROJECT))
            plain.append(timed(raw, clone, env))
            by_hand.append(timed(checked, clone, env))
            startup.append(timed([*invoke[:3], "--help", "send-series"], PROJECT))
        b4 = b4_time(clone, base, series.branch, env)
    warm_s, raw_s = statistics.median(toolkit), statistics.median(plain)
    hand_s = statistics.median(by_hand)
    start_s = statistics.median(startup)
    print(f"rounds: {rounds}, mails: {len(series.patches) + 1}, tree: Linux 7.2.13")
    print(f"raw git format-patch + send-email --dry-run: {raw_s:.3f} s (median)")
    print(f"invoke send-series --dry-run, cold caches:   {cold:.3f} s  ratio {cold / raw_s:.2f}x")
    print(
        f"invoke send-series --dry-run, warm:          {warm_s:.3f} s  ratio {warm_s / raw_s:.2f}x"
    )
    print(
        f"  of which interpreter + invoke start-up:   {start_s:.3f} s; without it "
        f"{(warm_s - start_s) / raw_s:.2f}x"
    )
    print(f"raw git + checkpatch/get_maintainer by hand: {hand_s:.3f} s (median)")
    print(f"  invoke send-series cold / that: {cold / hand_s:.2f}x, warm: {warm_s / hand_s:.2f}x")
    try:
        b4_s = float(b4)
        print(
            f"b4 send --dry-run:                           {b4_s:.3f} s  "
            f"toolkit/b4 {warm_s / b4_s:.2f}x"
        )
    except ValueError:
        print(f"b4: {b4}")
    print("target: at most 1.50x of raw git (the toolkit including its checks)")


if __name__ == "__main__":
    main()
