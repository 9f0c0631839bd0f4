"""User-facing errors: one clear sentence that says what is wrong and what to do.

Library code raises :class:`AttnshareError` for bad input; the CLI prints its message (no traceback) and exits 2.
"""


class AttnshareError(ValueError):
    """Bad input that the user can fix; the message is one sentence naming the problem and the fix."""


class MissingDependencyError(AttnshareError):
    """An optional dependency is missing; the message names the extra to install."""


def require(module: str, extra: str):
    """Import an optional dependency or raise a one-sentence error naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"The optional dependency '{module}' is not installed; run: pip install 'attnshare[{extra}]'."
        ) from e
