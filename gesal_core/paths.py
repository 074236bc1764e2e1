"""Where gesal-bot keeps things on disk.

Converted models and SVD factors are expensive to rebuild (tens of seconds each), so
they live in a cache directory that survives restarts. Operators point it at a volume
with ``GESAL_CACHE_DIR``; otherwise we follow the XDG base-directory convention.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the on-disk cache (models, SVD factors). Created on demand."""
    explicit = os.environ.get("GESAL_CACHE_DIR")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(xdg).expanduser() / "gesal-bot"
    root.mkdir(parents=True, exist_ok=True)
    return root


def data_dir() -> Path:
    """Root for durable state that is not a cache (the embedded Redis data)."""
    explicit = os.environ.get("GESAL_DATA_DIR")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        root = Path(xdg).expanduser() / "gesal-bot"
    root.mkdir(parents=True, exist_ok=True)
    return root
