"""Finding published checkpoint files: a local folder, or a Hugging Face hub repo id downloaded
(with progress bars) into the normal hub cache. HF_HOME and HF_HUB_OFFLINE are honoured by
huggingface_hub itself. Anything that cannot be had becomes one WeightsNotFound naming the way out."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import WeightsNotFound


def _way_out(component: str) -> str:
    flag = component.replace("_", "-")
    return (
        f"Download the files on a machine with network access and pass the folder with "
        f"`--{flag} DIR` (zoo.load(..., {component}=DIR)), or use `--tiny` (tiny=True) for a "
        f"random-weight smoke test."
    )


def resolve_files(
    source: str | os.PathLike,
    files: Sequence[str],
    *,
    component: str,
    optional: Sequence[str] = (),
) -> Path:
    """Return a folder holding every name in ``files`` (and whichever of ``optional`` exist).

    ``source`` is a local folder or a hub repo id such as "gpt-omni/mini-omni".
    """
    path = Path(source).expanduser()
    if path.is_dir():
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise WeightsNotFound(
                f"{component}: folder {path} lacks {missing} (expected the files exactly as "
                f"published). {_way_out(component)}"
            )
        return path
    if path.exists() or os.sep in str(source) and not _looks_like_repo_id(str(source)):
        raise WeightsNotFound(f"{component}: {source} is not a folder. {_way_out(component)}")
    return _download(str(source), files, optional, component)


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _download(repo_id: str, files: Sequence[str], optional: Sequence[str], component: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[*files, *optional]))
    except Exception as err:  # offline, no network, unknown repo, auth: all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        how = "HF_HUB_OFFLINE is set and the files are not in the local cache" if offline else (
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        )
        raise WeightsNotFound(
            f"{component}: could not get {list(files)} from the Hugging Face hub repo "
            f"'{repo_id}' ({how}). {_way_out(component)}"
        ) from None
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise WeightsNotFound(
            f"{component}: hub repo '{repo_id}' has no {missing}. {_way_out(component)}"
        )
    return folder
