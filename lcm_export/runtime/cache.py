"""The one place lcm-export's user cache folder is decided (compiled graphs, verified hashes, timing caches).

``$LCM_EXPORT_CACHE_DIR`` when set and not empty, else ``$XDG_CACHE_HOME/lcm-export``, else
``~/.cache/lcm-export``; ``~`` is expanded in every form. Standard library only: the runtime, its backends and the
targets all read it.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENVIRONMENT_VARIABLE = "LCM_EXPORT_CACHE_DIR"


def cache_root() -> Path:
    """lcm-export's user cache folder (not created here)."""
    root = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "lcm-export"
