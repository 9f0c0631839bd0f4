"""Progress bars: tqdm behind one process-wide switch.

Library functions take ``progress=`` for their own bars; the CLI's ``--no-progress`` turns every bar of the process
off at once (planners, fits, evaluations, training), so a command run into a log file writes no bar at all.
"""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm

_SHOWN = {"bars": True}


def show_progress(enabled: bool) -> None:
    """Show (True) or hide (False) every attnshare progress bar of this process from now on."""
    _SHOWN["bars"] = enabled


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, hidden where ``show`` is False or bars are off for the process."""
    return tqdm(iterable, disable=not (show and _SHOWN["bars"]), **kwargs)
