"""Streaming safetensors access for HF checkpoint directories.

Reading opens each shard lazily (memory-mapped) and copies out one tensor at a time; writing plans the shard
layout up front from names, shapes and dtypes, then materialises and writes one shard at a time. Every error
names the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy backend needs)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ring_jax.errors import RingJaxError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tokenizer, generation and remote-code files copied alongside the weights when present.
ASSET_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "configuration_*.py",
    "modeling_*.py",
    "tokenization_*.py",
)


class CheckpointError(RingJaxError):
    """A checkpoint that cannot be converted; the message names the tensor and/or file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "BF16", "F32"


def _header(file: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(file, framework="np") as handle:
            return {
                name: TensorInfo(
                    name, file, tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype()
                )
                for name in handle.keys()  # noqa: SIM118 (safe_open handles are not iterable)
            }
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from e


class SafetensorsReader:
    """All tensors of an HF directory: `model.safetensors` or shards listed by `model.safetensors.index.json`.

    Opening validates every shard header (a truncated or corrupt file fails here, before anything is written)
    and checks the index against the files. Tensors are read in per-file groups so each shard is opened once
    per call.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        else:
            weight_map = {}
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory}: no *.safetensors files and no {INDEX_FILE}")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            file = self.directory / name
            if not file.is_file():
                raise CheckpointError(f"{index}: lists {name}, which does not exist")
            for tensor, info in _header(file).items():
                if tensor in self.tensors:
                    raise CheckpointError(f"tensor {tensor!r} appears in both {self.tensors[tensor].file} and {file}")
                self.tensors[tensor] = info
        for tensor, name in weight_map.items():
            info = self.tensors.get(tensor)
            if info is None or info.file.name != name:
                raise CheckpointError(f"tensor {tensor!r}: {index} places it in {name}, which does not contain it")

    @property
    def total_bytes(self) -> int:
        return sum(info.file.stat().st_size for info in {i.file: i for i in self.tensors.values()}.values())

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (name, array) for `names`, grouped by file; each array is an owned host copy."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        for file, group in by_file.items():
            try:
                with safe_open(file, framework="np") as handle:
                    for name in group:
                        yield name, handle.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: failed reading tensor(s) {group[:3]}…: {e}") from e


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    materialize: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_sharded(
    tensors: list[PlannedTensor],
    directory: Path,
    max_shard_bytes: int,
    on_tensor: Callable[[str], None] = lambda name: None,
) -> list[Path]:
    """Writes tensors in order into `model-0000k-of-0000N.safetensors` shards of at most max_shard_bytes (a
    larger tensor gets a shard of its own) plus the index; a single shard is written as `model.safetensors`
    without index. Only one shard's tensors are materialised at a time."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map: dict[str, str] = {}
    for shard, file_name in zip(shards, names, strict=True):
        arrays = {}
        for tensor in shard:
            array = np.ascontiguousarray(tensor.materialize())
            if array.shape != tensor.shape or array.dtype != tensor.dtype:
                raise CheckpointError(
                    f"tensor {tensor.name!r}: produced {array.dtype}{list(array.shape)}, "
                    f"planned {tensor.dtype}{list(tensor.shape)}"
                )
            arrays[tensor.name] = array
            weight_map[tensor.name] = file_name
            on_tensor(tensor.name)
        save_file(arrays, directory / file_name, metadata={"format": "pt"})
        del arrays
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / name for name in names]


def copy_assets(src: Path, dst: Path) -> list[str]:
    """Copies tokenizer / generation / remote-code files present in `src` to `dst`; returns their names."""
    copied = []
    for pattern in ASSET_PATTERNS:
        for file in sorted(src.glob(pattern)):
            if file.is_file():
                (dst / file.name).write_bytes(file.read_bytes())
                copied.append(file.name)
    return copied
