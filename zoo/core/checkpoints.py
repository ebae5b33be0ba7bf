"""Finding published checkpoint files: a local folder, or a Hugging Face hub repo id downloaded
(with progress bars) into the normal hub cache. HF_HOME and HF_HUB_OFFLINE are honoured by
huggingface_hub itself. Anything that cannot be had becomes one WeightsNotFound naming the way out."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .errors import CheckpointMismatch, WeightsNotFound

SHOWN_NAMES = 20  # tensor names listed per kind of problem; the rest are counted


def _way_out(component: str) -> str:
    flag = component.replace("_", "-")
    return (
        f"Download the files on a machine with network access and pass the folder with "
        f"`--{flag} DIR` (zoo.load(..., {component}=DIR)), or use `--tiny` (random_weights='tiny') for "
        f"a random-weight smoke test."
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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict of tensors, loaded with ``weights_only=True`` (memory-mapped where the
    file allows it), or from a ``.safetensors`` file; anything else is a CheckpointMismatch naming
    the file."""
    if path.suffix in (".safetensors", ".sft"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointMismatch(f"{path}: not a readable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file: mmap is not possible
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or non-torch file
        raise CheckpointMismatch(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatch(f"{path}: expected a flat state dict of tensors, got {type(state).__name__}")
    return dict(state)


def mismatch_problems(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str]) -> str:
    """One line naming every problem of a file against its module ("" when there is none), e.g.
    ``2 missing: a, b; 1 wrong shape: c: file (3,), model (4,)``."""
    parts = []
    for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if names:
            shown = ", ".join(names[:SHOWN_NAMES])
            more = f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else ""
            parts.append(f"{len(names)} {title}: {shown}{more}")
    return "; ".join(parts)


def strict_problems(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], published=None) -> str:
    """Every difference of a file's tensors (``theirs``, in the module's naming) from a module's
    (``ours``) in key set and shapes, as one line (``mismatch_problems``); names in the file's
    naming through ``published`` (module keys -> file keys, on dicts)."""
    published = published or (lambda d: d)
    missing = sorted(published({k: None for k in ours.keys() - theirs.keys()}))
    unexpected = sorted(published({k: None for k in theirs.keys() - ours.keys()}))
    shapes = sorted(f"{name}: file {tuple(theirs[key].shape)}, model {tuple(ours[key].shape)}"
                    for key, name in zip(ours, published({k: None for k in ours}))
                    if key in theirs and theirs[key].shape != ours[key].shape)
    return mismatch_problems(missing, unexpected, shapes)


def load_strict(module: torch.nn.Module, path: Path, expected: str, *, rename=None, published=None) -> None:
    """Load the state dict in ``path`` into ``module`` with exactly its key set and shapes, else
    one CheckpointMismatch naming every problem (in the file's naming) and what was ``expected``.
    ``rename``: file keys -> module keys; ``published``: module keys -> file keys (for messages),
    both on dicts."""
    state = read_state_dict(path)
    theirs = rename(state) if rename else state
    problems = strict_problems(module.state_dict(), theirs, published)
    if problems:
        raise CheckpointMismatch(f"{path} does not match {expected}: {problems}")
    module.load_state_dict(theirs, strict=True, assign=True)
