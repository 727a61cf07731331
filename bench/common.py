"""What every bench script shares: the project on sys.path, and timing one command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """Wall-clock seconds of one run of `cmd`, which must succeed."""
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=env)
    return time.perf_counter() - started
