"""A Hugging Face checkpoint folder: ``config.json``, its safetensors (one file or shards
named by ``model.safetensors.index.json``), ``tokenizer.json``, ``tokenizer_config.json``.

Tensors are read with ``safetensors`` (memory-mapped). Its numpy API cannot produce
bfloat16 (numpy has no such dtype), so BF16 tensors are read from the byte range the
file's header gives, as uint16, and widened to float32: exact, since a bfloat16 is the
top half of a float32.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
    """The folder is not a checkpoint bitserve can convert; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class TensorRef:
    file: Path
    dtype: str  # safetensors' name: "BF16", "F16", "F32", "U8", ...
    shape: tuple[int, ...]


class Checkpoint:
    """Read-only access to a checkpoint folder's config, tokenizer files and tensors."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config: dict[str, Any] = self._json("config.json")
        self._tensors: dict[str, TensorRef] = {}
        for file in self._weight_files():
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    view = f.get_slice(name)
                    self._tensors[name] = TensorRef(file, view.get_dtype(), tuple(view.get_shape()))

    def _json(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        try:
            value = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{self.folder} has no {name}") from None
        except ValueError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path} is not a JSON object")
        return value

    def optional_json(self, name: str) -> dict[str, Any]:
        """``name``'s JSON object, or {} if the file is absent."""
        return self._json(name) if (self.folder / name).is_file() else {}

    def _weight_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = self._json(index.name).get("weight_map", {})
            names = set(weight_map.values())
            for name in names:  # the index comes with the checkpoint: anyone's repository
                if not isinstance(name, str) or Path(name).name != name:
                    raise CheckpointError(
                        f"{index}: shard {name!r} is outside the checkpoint folder"
                    )
            return [self.folder / name for name in sorted(names)]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder} holds no .safetensors weights")
        return files

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def ref(self, name: str) -> TensorRef:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"the checkpoint has no tensor {name!r}") from None

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as numpy: floats as float32 (BF16/F16 widened exactly), integers as
        they are stored."""
        ref = self.ref(name)
        if ref.dtype == "BF16":
            raw = _raw_view(ref.file, name, np.dtype("<u2"), ref.shape)
            return (raw.astype(np.uint32) << 16).view(np.float32)
        with safe_open(ref.file, framework="numpy") as f:
            array: np.ndarray = f.get_tensor(name)
        if array.dtype.kind == "f":
            return array.astype(np.float32)
        return array


def _raw_view(file: Path, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """The bytes of tensor ``name`` as ``dtype`` (the safetensors layout: an 8-byte header
    length, the JSON header with each tensor's ``data_offsets``, then the data)."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    start, end = header[name]["data_offsets"]
    count = int(np.prod(shape, dtype=np.int64))
    if end - start != count * dtype.itemsize:
        raise CheckpointError(f"{file}: tensor {name!r} holds {end - start} bytes, not {shape}")
    data = np.memmap(file, dtype=dtype, mode="r", offset=8 + header_len + start, shape=(count,))
    return np.asarray(data).reshape(shape)
