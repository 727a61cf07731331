"""Where the toolkit keeps things: the project checkout and the user's cache."""

import os
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """~/.cache/kseries (or $XDG_CACHE_HOME/kseries): big downloads and build trees live here."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kseries"
