"""The tensors of a TorchScript archive (``torch.jit.save``), read as data.

Some published weights exist only as TorchScript archives (OpenAI's CLIP ``ViT-B-32.pt``).
``torch.load(weights_only=True)`` refuses them and ``torch.jit.load`` would compile and run the
code stored in the file. This reader opens the zip, unpickles ``data.pkl`` with an unpickler that
knows only the few globals a module's state needs (tensor rebuilding, storage types,
OrderedDict) and turns every scripted class into an inert record of its attributes; the
``code/`` entries are never read. The result is a flat ``{dotted.name: tensor}`` dict, like a
``state_dict`` (plain tensor attributes included, e.g. a stored attention mask)."""
from __future__ import annotations

import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointMismatch

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class ScriptedObject:
    """A scripted class instance as plain data: its attributes, nothing callable."""

    def __init__(self, qualified_name: str) -> None:
        self.qualified_name = qualified_name
        self.attributes: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.qualified_name}: unexpected state {type(state).__name__}")
        self.attributes = dict(state)


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _scripted_class(qualified_name: str):
    def make(*args) -> ScriptedObject:
        if args:
            raise pickle.UnpicklingError(f"{qualified_name}: constructor arguments are not supported")
        return ScriptedObject(qualified_name)

    # NEWOBJ calls cls.__new__(cls, *args): a class object whose __new__ builds the record
    return type("Scripted", (), {"__new__": staticmethod(lambda cls, *a: make(*a))})


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None,
                    metadata=None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2's arguments -> a tensor view of ``storage`` (a flat tensor)."""
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, torch.Tensor] = {}
        self.little_endian = self._little_endian()

    def _little_endian(self) -> bool:
        name = f"{self.prefix}byteorder"
        if name in self.archive.namelist():  # written since torch 1.12; older archives are little-endian
            return self.archive.read(name).decode().strip() == "little"
        return True

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _scripted_class(f"{module}.{name}")
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"{self.path}: refusing to load {module}.{name} (not tensor data)")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"{self.path}: unsupported persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            flat = torch.frombuffer(raw, dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
            if self.little_endian != (sys.byteorder == "little") and flat.element_size() > 1:
                flat = torch.from_numpy(flat.numpy().byteswap())
            if flat.numel() < int(numel):
                raise pickle.UnpicklingError(f"{self.path}: storage {key} holds {flat.numel()} of {numel} elements")
            self.storages[key] = flat
        return self.storages[key]


def _flatten(value: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = value.clone()  # own memory: not a view of the archive's bytes
    elif isinstance(value, ScriptedObject) and id(value) not in seen:
        seen.add(id(value))
        for name, attribute in value.attributes.items():
            _flatten(attribute, f"{prefix}.{name}" if prefix else name, out, seen)


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the scripted module in ``path``, by dotted name (no code runs)."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointMismatch(f"{path}: not a TorchScript archive ({err})") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointMismatch(f"{path}: not a TorchScript archive (no single <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            root = _Unpickler(archive.read(pickles[0]), archive, prefix, path).load()
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError) as err:
            raise CheckpointMismatch(f"{path}: unreadable TorchScript data ({err})") from None
    if not isinstance(root, ScriptedObject):
        raise CheckpointMismatch(f"{path}: the archive does not hold a scripted module")
    tensors: dict[str, torch.Tensor] = {}
    _flatten(root, "", tensors, set())
    return tensors
