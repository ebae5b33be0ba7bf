"""Tiny random-weight checkpoint folders for tests and smoke runs, written once per key into a
cache directory ($ZOO_TINY_DIR, else the system temp folder) and reused; concurrent writers are
safe (each writes a private staging folder, the first rename wins)."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cached_folder(key: str, write: Callable[[Path], None], root: str | os.PathLike | None = None) -> Path:
    """The folder for ``key``, calling ``write(folder)`` to fill it the first time."""
    root = Path(root or os.environ.get("ZOO_TINY_DIR") or Path(tempfile.gettempdir()) / "omni-zoo-tiny")
    target = root / key
    if not (target / "complete").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root))
        write(staging)
        (staging / "complete").write_text("ok\n")
        try:
            staging.rename(target)
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(staging, ignore_errors=True)
    return target
