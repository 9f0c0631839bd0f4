"""Where attnshare keeps downloaded and converted assets (never inside the repository)."""

import os
from pathlib import Path

CACHE_ENV = "ATTNSHARE_CACHE"


def cache_dir() -> Path:
    """The cache root: ``$ATTNSHARE_CACHE``, else ``$XDG_CACHE_HOME/attnshare``, else ``~/.cache/attnshare``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnshare"
