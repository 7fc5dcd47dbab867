"""Public conversion API: HF directory / PyTorch state dict ⇄ RingLinearModel ⇄ ring_jax checkpoint."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ring_jax.config import SUPPORTED_DTYPES, ModelConfig, model_defaults
from ring_jax.convert import checkpoint as ckpt
from ring_jax.convert.hf_config import apply_hf_config, model_to_hf_config, read_hf_config
from ring_jax.convert.safetensors_io import (
    CheckpointError,
    PlannedTensor,
    SafetensorsReader,
    TensorInfo,
    copy_assets,
    write_sharded,
)
from ring_jax.convert.transfer import FLOAT_CODES, TensorSource, load_state, model_tensors, source_mtp_layout
from ring_jax.model import RingLinearModel

DEFAULT_MAX_SHARD_SIZE = "5GB"
log = logging.getLogger(__name__)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """'5GB', '500MiB', 1000000 -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", size)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"max shard size {size!r}: expected e.g. '5GB', '500MB', '2GiB' or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {name!r} is not supported (one of {SUPPORTED_DTYPES})")
    return name


def _checkpoint_dtype(hf: Mapping[str, Any], source: TensorSource) -> str:
    """The weight dtype of a checkpoint: its embedding table's, else the declared torch_dtype / dtype."""
    info = source.tensors.get("model.word_embeddings.weight")
    if info is not None and FLOAT_CODES.get(info.dtype) in SUPPORTED_DTYPES:
        return FLOAT_CODES[info.dtype]
    declared = hf.get("torch_dtype") or hf.get("dtype")
    return declared if declared in SUPPORTED_DTYPES else "float32"


def _model_config(
    hf: Mapping[str, Any],
    where: str,
    source: TensorSource,
    dtype: str,
    compute_dtype: Any,
    overrides: Mapping[str, Any] | None,
) -> ModelConfig:
    """config.model for an HF config and its tensors: a config.json whose num_hidden_layers counts the MTP blocks
    (the Ling-2.0 layout) gives a main stack without them."""
    section = model_defaults()
    apply_hf_config(section, hf, where)
    mtp = source_mtp_layout(source, section.num_hidden_layers, section.num_nextn_predict_layers)
    if mtp.kind == "inside":
        log.warning(
            "%s: num_hidden_layers=%d counts the %d MTP blocks stored as model.layers.%d… (the Ling-2.0 layout); "
            "loading a main stack of %d layers (to-hf writes them after it, the Ling-2.5 layout)",
            where, section.num_hidden_layers, section.num_nextn_predict_layers, mtp.main_layers, mtp.main_layers,
        )  # fmt: skip
        section.num_hidden_layers = mtp.main_layers
    section.param_dtype = dtype
    section.dtype = _dtype_name(compute_dtype) if compute_dtype is not None else dtype
    section.update(dict(overrides or {}))
    return ModelConfig.from_config(section)


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def _load(source: TensorSource, config: ModelConfig, mesh: Mesh | None, progress: bool) -> RingLinearModel:
    with _progress(len(source.tensors), "loading tensors", progress) as bar:
        return load_state(source, config, mesh=mesh, on_tensor=lambda name: bar.update())


def from_hf(
    path: str | Path,
    dtype: Any = None,
    *,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> RingLinearModel:
    """Loads an HF Ring-linear directory (config.json + safetensors, sharded or not) into a RingLinearModel.

    dtype: weight dtype (default: the checkpoint's); compute_dtype defaults to it. overrides: extra
    `config.model` fields (e.g. {"decay_layer_offset": 0}). With `mesh`, each tensor is placed straight on its
    sharding. The result maps int tokens [batch, seq] to fp32 logits [batch, seq, vocab]: `model(tokens)`.
    """
    path = Path(path)
    reader = SafetensorsReader(path)
    config = _hf_model_config(path, reader, dtype, compute_dtype, overrides)
    return _load(reader, config, mesh, progress)


def hf_model_config(path: str | Path, dtype: Any = None, *, compute_dtype: Any = None,
                    overrides: Mapping[str, Any] | None = None) -> ModelConfig:  # fmt: skip
    """The ModelConfig `from_hf(path, dtype, ...)` loads into: the fields of the directory's config.json (a Ling-2.0
    layout, whose num_hidden_layers counts the MTP blocks, gives the main stack without them), weights in `dtype`
    (default: the checkpoint's)."""
    path = Path(path)
    return _hf_model_config(path, SafetensorsReader(path), dtype, compute_dtype, overrides)


def _hf_model_config(path: Path, reader: SafetensorsReader, dtype: Any, compute_dtype: Any,
                     overrides: Mapping[str, Any] | None) -> ModelConfig:  # fmt: skip
    hf = read_hf_config(path)
    weight_dtype = _dtype_name(dtype) if dtype is not None else _checkpoint_dtype(hf, reader)
    return _model_config(hf, str(path / "config.json"), reader, weight_dtype, compute_dtype, overrides)


def write_hf(
    tensors: list[PlannedTensor],
    config: ModelConfig,
    directory: Path,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    hf_passthrough: Mapping[str, Any] | None = None,
    assets_from: Path | None = None,
    progress: bool = True,
) -> None:
    """Writes config.json, safetensors shards (+ index) and assets into an existing directory."""
    weight_dtype = next(t.dtype.name for t in tensors if t.name == "model.word_embeddings.weight")
    hf = model_to_hf_config(config, torch_dtype=weight_dtype, passthrough=hf_passthrough)
    with _progress(len(tensors), "writing tensors", progress) as bar:
        write_sharded(tensors, directory, parse_size(max_shard_size), on_tensor=lambda name: bar.update())
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if assets_from is not None and assets_from.is_dir():
        copy_assets(assets_from, directory)


def to_hf(
    model: RingLinearModel,
    path: str | Path,
    *,
    dtype: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    like: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Writes `model` as an HF Ring-linear directory (atomic: a temp dir beside `path`, renamed when
    complete).

    like: an HF directory or ring_jax checkpoint whose inert config fields (token ids, auto_map, …) and
    tokenizer files are carried over.
    """
    passthrough, assets = carried_over(like)
    with ckpt.atomic_directory(path, overwrite=overwrite) as tmp:
        write_hf(
            model_tensors(model, _dtype_name(dtype) if dtype is not None else None),
            model.config,
            tmp,
            max_shard_size=max_shard_size,
            hf_passthrough=passthrough,
            assets_from=assets,
            progress=progress,
        )


def carried_over(like: str | Path | None) -> tuple[dict, Path | None]:
    """(inert config.json fields, folder of tokenizer / generation / remote-code files) of an HF directory or a
    ring_jax model checkpoint, for an export to carry over; ({}, None) for None."""
    if like is None:
        return {}, None
    like = Path(like)
    if (like / ckpt.METADATA_FILE).is_file():
        return ckpt.read_metadata(like)["hf_passthrough"], like / ckpt.ASSETS_DIR
    from ring_jax.convert.hf_config import hf_to_model_fields

    return hf_to_model_fields(read_hf_config(like), str(like / "config.json"))[1], like


def hf_to_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: Any = None,
    overrides: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """HF directory -> ring_jax checkpoint directory (see `ring_jax.convert.checkpoint` for the layout).

    Without `mesh` the whole model is held in host memory (plus Orbax's write buffers); with a mesh of
    accelerators each tensor goes to device memory as soon as it is read, so the host holds about one ring_jax
    leaf at a time and Orbax writes from the devices.
    """
    src = Path(src)
    ckpt.refuse_existing(dst, overwrite)  # before the (long) load, not after it
    model = from_hf(src, dtype, overrides=overrides, mesh=mesh, progress=progress)
    passthrough, _ = carried_over(src)
    with ckpt.atomic_directory(dst, overwrite=overwrite) as tmp:
        ckpt.save_checkpoint(model, tmp, passthrough)
        (tmp / ckpt.ASSETS_DIR).mkdir()
        copy_assets(src, tmp / ckpt.ASSETS_DIR)


def checkpoint_to_hf(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """ring_jax checkpoint directory -> HF directory (config.json, shards, index, tokenizer files).

    Streams: ring_jax leaves are restored in batches of about one shard, so HF shards group the tensors of one
    ring_jax leaf (e.g. an expert projection of every cycle) rather than whole layers; the index says where each
    tensor is, which is all HF / vLLM / SGLang loaders use.
    """
    shard_bytes = parse_size(max_shard_size)
    config, tensors = ckpt.checkpoint_tensors(
        src, dtype=_dtype_name(dtype) if dtype is not None else None, batch_bytes=shard_bytes
    )
    passthrough, assets = carried_over(src)
    with ckpt.atomic_directory(dst, overwrite=overwrite) as tmp:
        write_hf(
            tensors,
            config,
            tmp,
            max_shard_size=shard_bytes,
            hf_passthrough=passthrough,
            assets_from=assets,
            progress=progress,
        )


# ----------------------------------------------------------------------------------------------------
# PyTorch state dicts (torch is imported lazily: it is an optional dependency).


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import ml_dtypes
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _numpy_to_torch(array: np.ndarray) -> Any:
    import torch

    array = np.require(array, requirements=["C", "W"])  # torch wants a contiguous, writable buffer
    if array.dtype.name == "bfloat16":  # numpy has no native bfloat16: move the bits
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class _StateDictSource:
    """A PyTorch state dict as a TensorSource."""

    _CODES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}

    def __init__(self, state_dict: Mapping[str, Any]):
        self._state_dict = state_dict
        where = Path("<state_dict>")
        self.tensors = {name: TensorInfo(name, where, tuple(t.shape), self._code(t)) for name, t in state_dict.items()}

    @classmethod
    def _code(cls, tensor: Any) -> str:
        name = str(tensor.dtype).removeprefix("torch.")
        return cls._CODES.get(name, name)

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        for name in names:
            yield name, _torch_to_numpy(self._state_dict[name])


def to_torch_state_dict(model: RingLinearModel, dtype: Any = None) -> dict[str, Any]:
    """HF-named torch tensors ([out, in] Linear layout, experts unstacked, expert_bias fp32), CPU."""
    return {
        t.name: _numpy_to_torch(t.materialize())
        for t in model_tensors(model, _dtype_name(dtype) if dtype is not None else None)
    }


def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any] | ml_collections.ConfigDict | ModelConfig,
    *,
    dtype: Any = None,
    mesh: Mesh | None = None,
) -> RingLinearModel:
    """A RingLinearModel from an HF-named torch state dict.

    config: an HF config.json dict, a `config.model` ConfigDict, or a ModelConfig. dtype overrides the weight
    dtype (default: the config's param_dtype, or for an HF dict the state dict's own dtype).
    """
    source = _StateDictSource(state_dict)
    if isinstance(config, ModelConfig):
        model_config = config if dtype is None else config.replace(param_dtype=_dtype_name(dtype))
    elif isinstance(config, ml_collections.ConfigDict):
        model_config = ModelConfig.from_config(config)
        if dtype is not None:
            model_config = model_config.replace(param_dtype=_dtype_name(dtype))
    elif isinstance(config, Mapping):
        weight_dtype = _dtype_name(dtype) if dtype is not None else _checkpoint_dtype(config, source)
        model_config = _model_config(config, "config", source, weight_dtype, None, None)
    else:
        raise TypeError(f"config must be an HF config dict, a ConfigDict or a ModelConfig, got {type(config)}")
    return _load(source, model_config, mesh, progress=False)


__all__ = [
    "CheckpointError",
    "checkpoint_to_hf",
    "from_hf",
    "from_torch_state_dict",
    "hf_model_config",
    "hf_to_checkpoint",
    "to_hf",
    "to_torch_state_dict",
]
