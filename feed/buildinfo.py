"""What this process is running: package version and source revision.

:func:`version` reads the installed package's metadata (``oddsfeed``);
:func:`revision` is ``ODDSFEED_REVISION`` when set (a container build passes
it), else ``git rev-parse HEAD`` of the source tree when the package runs
from a git checkout (an editable install), else None. Both are computed once
per process (cached): callers ask at startup, never per request.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["SOURCE_ROOT", "revision", "version"]

#: the directory holding the ``feed`` and ``streaming`` packages
SOURCE_ROOT = Path(__file__).resolve().parents[1]

_REVISION = re.compile(r"^[0-9a-zA-Z._-]{1,64}$")


@functools.cache
def version() -> str:
    """The installed ``oddsfeed`` version ("unknown" when not installed)."""
    try:
        return metadata.version("oddsfeed")
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def revision() -> str | None:
    """The source revision (see the module docstring), or None when unknown."""
    env = os.environ.get("ODDSFEED_REVISION", "").strip()
    if env:
        return env if _REVISION.match(env) else None
    # only the source tree itself: a package installed under some other checkout
    # (a venv inside a repository) must not report that repository's commit
    if not (SOURCE_ROOT / ".git").exists():
        return None
    try:
        res = subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = res.stdout.strip()
    return rev if res.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", rev) else None
