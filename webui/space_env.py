"""What space/app.py does before anything else is imported: ZeroGPU's ``spaces`` package first
(it must come before CUDA is touched), and the hub cache on the Space's persistent volume."""
from __future__ import annotations

import os
from pathlib import Path


def import_spaces_first() -> bool:
    """Import ``spaces`` (present on Hugging Face Spaces) before torch; False where it is absent."""
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def use_persistent_hub_cache(data: Path = Path("/data"), environ=os.environ) -> str | None:
    """``HF_HOME`` on the persistent volume (``/data`` on a Space with persistent storage) unless
    the operator set it: weights are then downloaded once, not after every restart. Must run
    before huggingface_hub is imported (it reads ``HF_HOME`` then). Returns the hub cache's home."""
    if environ.get("HF_HOME"):
        return environ["HF_HOME"]
    if data.is_dir() and os.access(data, os.W_OK):
        environ["HF_HOME"] = str(data / ".huggingface")
        return environ["HF_HOME"]
    return None
