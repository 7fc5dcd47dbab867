"""The two generic drivers over a `mapping` plan: HF-named tensors → ring_jax model, ring_jax model → HF-named
tensors.

Both are independent of where HF tensors live: a `TensorSource` is a safetensors directory or an in-memory
(PyTorch) state dict. Import assembles one ring_jax leaf at a time on the host (filling stacked cycle / expert
slots from individual HF tensors), places it on its target sharding and drops the host buffer, so host memory
holds at most one leaf plus the tensor being copied. Export yields HF tensors lazily, one at a time, in HF
order or grouped by ring_jax leaf (for streaming from a checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ring_jax.config import ModelConfig
from ring_jax.convert.hf_config import check_exportable
from ring_jax.convert.mapping import (
    LeafPlan,
    MTPLayout,
    Path,
    Piece,
    build_plan,
    is_ignored_hf_name,
    mtp_layout,
    path_str,
)
from ring_jax.convert.safetensors_io import CheckpointError, PlannedTensor, TensorInfo
from ring_jax.layers.moe import ExpertBias
from ring_jax.model import RingLinearModel, abstract_model, layer_locations
from ring_jax.sharding import state_shardings

# safetensors dtype codes ⇄ numpy dtypes of the floating-point tensors a checkpoint may hold.
FLOAT_CODES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
PERSISTENT = nnx.Any(nnx.Param, ExpertBias)  # what a checkpoint stores (ExpertLoad is per-step scratch)
log = logging.getLogger(__name__)


class TensorSource(Protocol):
    tensors: dict[str, TensorInfo]

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]: ...


def split_abstract(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, persistent state, other variables) of the model with ShapeDtypeStruct leaves: nothing allocated."""
    return nnx.split(abstract_model(config), PERSISTENT, ...)


def _flat(state: nnx.State) -> dict[Path, nnx.Variable]:
    return dict(nnx.to_flat_state(state))


def model_plan(config: ModelConfig, abstract_state: nnx.State, mtp: MTPLayout | None = None) -> dict[Path, LeafPlan]:
    """The mapping plan for `config` (MTP blocks named as `mtp` says, by default as ring_jax writes them), checked
    against the model's parameter tree in both directions."""
    plan = build_plan(config, layer_locations(config), mtp)
    leaves = _flat(abstract_state)
    missing = sorted(path_str(p) for p in leaves if p not in plan)
    extra = sorted(path_str(p) for p in plan if p not in leaves)
    if missing or extra:
        raise NotImplementedError(
            f"HF mapping and ring_jax parameter tree disagree: unmapped ring_jax parameters {missing[:5]}, "
            f"mapped paths absent from the model {extra[:5]}"
        )
    for path, leaf_plan in plan.items():
        shape = leaves[path].get_value().shape
        slots = {piece.index for piece in leaf_plan.pieces}
        stacked_dims = {len(piece.index) for piece in leaf_plan.pieces}
        if leaf_plan.pieces and (len(stacked_dims) != 1 or len(slots) != np.prod(shape[: stacked_dims.pop()])):
            raise NotImplementedError(f"{path_str(path)}: HF tensors do not fill every stacked slot of {shape}")
    return plan


def _expected_hf_shape(leaf_shape: tuple[int, ...], piece: Piece) -> tuple[int, ...]:
    return piece.transform.hf_shape(leaf_shape[len(piece.index) :])


def source_mtp_layout(source: TensorSource, num_hidden_layers: int, num_nextn_predict_layers: int) -> MTPLayout:
    """`mapping.mtp_layout` of a source's tensor names; an ambiguous layout is a CheckpointError naming the source."""
    try:
        return mtp_layout(source.tensors, num_hidden_layers, num_nextn_predict_layers)
    except ValueError as e:
        raise CheckpointError(f"{_where(source)}: {e}") from None


def check_source(
    source: TensorSource, config: ModelConfig, plan: dict[Path, LeafPlan], leaves: dict, mtp: MTPLayout
) -> None:
    """Missing / unexpected tensors, wrong shapes and non-float dtypes, each named with its file, before any
    copy. Tensors of MTP blocks the config does not use are skipped with a warning saying how to load them."""
    expected: dict[str, tuple[int, ...]] = {}
    for path, leaf_plan in plan.items():
        shape = leaves[path].get_value().shape
        for piece in leaf_plan.pieces:
            expected[piece.hf_name] = _expected_hf_shape(shape, piece)
    missing = [name for name in expected if name not in source.tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        absent_block = next((depth for depth in range(mtp.held, config.num_nextn_predict_layers)
                             if missing[0].startswith(mtp.block_prefix(depth))), None)  # fmt: skip
        why = "" if absent_block is None else (
            f": it belongs to MTP block {absent_block}, but the checkpoint holds {mtp.held} MTP blocks and the "
            f"config asks for num_nextn_predict_layers={config.num_nextn_predict_layers}"
        )  # fmt: skip
        raise CheckpointError(f"missing tensor {missing[0]!r}{more} in {_where(source)}{why}")
    unused = []
    for name, info in source.tensors.items():
        if name not in expected:
            if is_ignored_hf_name(name):
                continue
            if mtp.is_unused(name, config.num_nextn_predict_layers):
                unused.append(name)
                continue
            raise CheckpointError(f"unexpected tensor {name!r} in {info.file} (no ring_jax parameter maps to it)")
        if info.shape != expected[name]:
            raise CheckpointError(
                f"tensor {name!r} in {info.file}: shape {list(info.shape)}, expected {list(expected[name])} "
                "from config.json"
            )
        if info.dtype not in FLOAT_CODES:
            raise CheckpointError(
                f"tensor {name!r} in {info.file}: dtype {info.dtype} is not a floating-point type "
                f"({', '.join(FLOAT_CODES)})"
            )
        if name.endswith("expert_bias") and info.dtype != "F32":
            raise CheckpointError(
                f"tensor {name!r} in {info.file}: dtype {info.dtype}, expected F32 (expert biases stay fp32)"
            )
    if unused:
        log.warning(
            "%s: skipping %d tensor(s) of MTP blocks the config does not use (e.g. %r): num_nextn_predict_layers=%d, "
            "the checkpoint holds %d MTP blocks; set model.num_nextn_predict_layers to load them",
            _where(source), len(unused), unused[0], config.num_nextn_predict_layers, mtp.held,
        )  # fmt: skip


def _where(source: TensorSource) -> str:
    files = sorted({str(info.file) for info in source.tensors.values()})
    return files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, …)"


def load_state(
    source: TensorSource,
    config: ModelConfig,
    *,
    mesh: Mesh | None = None,
    on_tensor: Callable[[str], None] = lambda name: None,
) -> RingLinearModel:
    """Builds a RingLinearModel for `config` whose weights come from `source` (HF names; MTP blocks in any of the
    layouts `mapping.mtp_layout` recognises).

    Weights take the config's param_dtype (expert biases fp32). With `mesh`, each leaf goes straight to the
    NamedSharding its logical axis names give on that mesh; otherwise to the default device.
    """
    graphdef, abstract_params, abstract_rest = split_abstract(config)
    mtp = source_mtp_layout(source, config.num_hidden_layers, config.num_nextn_predict_layers)
    plan = model_plan(config, abstract_params, mtp)
    leaves = _flat(abstract_params)
    check_source(source, config, plan, leaves, mtp)
    shardings = _flat(state_shardings(abstract_params, mesh)) if mesh is not None else {}

    values: list[tuple[Path, nnx.Variable]] = []
    for path, variable in leaves.items():
        abstract = variable.get_value()
        leaf_plan = plan[path]
        if leaf_plan.fill_absent is not None:
            host = np.full(abstract.shape, leaf_plan.fill_absent, abstract.dtype)
        else:
            host = np.empty(abstract.shape, abstract.dtype)
            pieces = {piece.hf_name: piece for piece in leaf_plan.pieces}
            for name, tensor in source.read_many(pieces):
                host[pieces[name].index] = pieces[name].transform.to_ring(tensor).astype(abstract.dtype, copy=False)
                on_tensor(name)
        if path in shardings:  # each process hands over only its addressable shards (works multi-host)
            device_value = jax.make_array_from_callback(
                host.shape, shardings[path], lambda index, host=host: host[index]
            )
        else:
            device_value = jax.device_put(host)
        del host
        values.append((path, variable.replace(device_value)))
    rest = [
        (path, variable.replace(jax.numpy.zeros(variable.get_value().shape, variable.get_value().dtype)))
        for path, variable in nnx.to_flat_state(abstract_rest)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(values), nnx.from_flat_state(rest))


@dataclass(frozen=True)
class _HFOut:
    name: str
    path: Path
    piece: Piece


def _export_order(plan: dict[Path, LeafPlan], order: str) -> list[_HFOut]:
    """ "hf": embeddings, layers by index (rules in table order, experts by id), then the final norm and lm_head.
    "leaf": all tensors of one ring_jax leaf together, leaves in plan order (lets a reader hold one leaf batch)."""
    entries = [_HFOut(piece.hf_name, path, piece) for path, lp in plan.items() for piece in lp.pieces]
    if order == "leaf":
        return entries

    def key(entry: _HFOut) -> tuple:
        parts = entry.name.split(".")
        if parts[:2] == ["model", "layers"]:
            return (1, int(parts[2]))
        return (0 if entry.name == "model.word_embeddings.weight" else 2, 0)

    return sorted(entries, key=key)  # stable: keeps rule and expert order within a layer


def export_tensors(
    config: ModelConfig,
    params: nnx.State,
    get_leaf: Callable[[Path], jax.Array],
    *,
    dtype: np.dtype | str | None = None,
    order: str = "hf",
) -> list[PlannedTensor]:
    """HF-named tensors of a model, materialised lazily (one at a time) in `order` ("hf" or "leaf").

    params: the persistent state (abstract is enough: only shapes, dtypes and variable types are read);
    get_leaf(path) returns the leaf's value when a tensor is materialised. Weights keep their dtype unless
    `dtype` is given; expert biases are always fp32.
    """
    check_exportable(config.to_dict())
    plan = model_plan(config, params)
    variables = _flat(params)
    planned = []
    for entry in _export_order(plan, order):
        leaf = variables[entry.path].get_value()
        is_bias = isinstance(variables[entry.path], ExpertBias)
        out_dtype = np.dtype("float32" if is_bias else (dtype or leaf.dtype))

        def materialize(path: Path = entry.path, piece: Piece = entry.piece, out_dtype=out_dtype) -> np.ndarray:
            value = get_leaf(path)
            part = np.asarray(jax.device_get(value[piece.index] if piece.index else value))
            return piece.transform.to_hf(part).astype(out_dtype, copy=False)

        shape = _expected_hf_shape(leaf.shape, entry.piece)
        planned.append(PlannedTensor(entry.name, shape, out_dtype, materialize))
    return planned


def model_tensors(model: RingLinearModel, dtype: np.dtype | str | None = None) -> list[PlannedTensor]:
    """An in-memory model's weights as HF-named tensors in HF order."""
    params = nnx.state(model, PERSISTENT)
    variables = _flat(params)
    return export_tensors(model.config, params, lambda path: variables[path].get_value(), dtype=dtype)


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """{HF name: (shape, 'bias' | 'weight')} of every tensor a checkpoint for `config` holds, in HF order."""
    _, params, _ = split_abstract(config)
    return {
        t.name: (t.shape, "bias" if t.name.endswith("expert_bias") else "weight")
        for t in export_tensors(config, params, get_leaf=None)  # type: ignore[arg-type]  (never materialised)
    }
