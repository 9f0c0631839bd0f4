"""The attnshare version (one place; the package metadata and artifacts read it from here)."""

__version__ = "0.1.0"
