"""Where attnshare keeps downloaded and converted assets (never inside the repository), and how files are read and
written there without leaving anything half-written."""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import AttnshareError

CACHE_ENV = "ATTNSHARE_CACHE"


def cache_dir() -> Path:
    """The cache root: ``$ATTNSHARE_CACHE``, else ``$XDG_CACHE_HOME/attnshare``, else ``~/.cache/attnshare``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnshare"


def write_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary folder beside ``target``, which then replaces ``target`` in one rename, so an
    interrupted write leaves nothing half-written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_file(path: Path, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one rename, so an
    interrupted write leaves nothing half-written (the file gets the usual permissions, not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_json(path: Path, missing: str, corrupt: str) -> Any:
    """The JSON value in ``path``; ``missing`` / ``corrupt`` (with ``{error}``, the exception's name) are the
    one-sentence errors for an absent file and for one that is not JSON."""
    if not Path(path).is_file():
        raise AttnshareError(missing)
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttnshareError(corrupt.format(error=e.__class__.__name__)) from e
