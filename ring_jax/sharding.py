"""Logical axis names and the one table that maps them to mesh axes.

Every parameter carries logical axis names (flax `out_sharding` metadata) and activations are constrained with
`constrain(x, names)`. A mesh built from the config (`data`, `fsdp`, `expert`, `tensor`) gives them meaning through
`DEFAULT_LOGICAL_AXIS_RULES`; with no mesh in context the constraints are no-ops, so the same code runs on one CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

LogicalNames = tuple[str | None, ...]

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_tokens", ("data", "fsdp")),
)


def logical_to_mesh_spec(
    names: Sequence[str | None], rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = DEFAULT_LOGICAL_AXIS_RULES
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once (later uses replicate)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(axis for axis in axes if axis not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def annotated(kind: type[nnx.Variable], value: jax.Array, names: LogicalNames) -> nnx.Variable:
    """A variable of `kind` holding `value`, annotated with logical axis names.

    Placement is explicit (`state_shardings` + jit `out_shardings`), never eager at construction, so the same
    modules build on one CPU, under `nnx.eval_shape`, and sharded over any mesh.
    """
    return kind(value, out_sharding=names, eager_sharding=False)


def resolve_mesh_sizes(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Per-axis sizes with the one allowed -1 replaced by the devices left over by the other axes."""
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    if -1 in sizes:
        known = -math.prod(sizes)
        if num_devices % known:
            raise ValueError(f"{num_devices} devices are not divisible by the fixed axes (product {known})")
        sizes[sizes.index(-1)] = num_devices // known
    return tuple(sizes)


def make_mesh(sizes: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over MESH_AXES with Auto axis types (sharding propagates; shard_map islands where needed).

    sizes: per-axis sizes in MESH_AXES order or by name (missing names are 1); one size may be -1 (the rest).
    """
    if isinstance(sizes, Mapping):
        unknown = set(sizes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
        sizes = [sizes.get(axis, 1) for axis in MESH_AXES]
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_sizes(sizes, len(devices))
    needed = math.prod(sizes)
    if needed > len(devices) or needed <= 0:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {needed} devices, have {len(devices)}")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices[:needed])


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Keeps only mesh axes present in `mesh` that divide their dimension (a vocab of 131 stays whole on tensor=2)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.axis_names)
        size = math.prod(mesh.shape[name] for name in names)
        fitted.append(None if not names or dim % size else names[0] if len(names) == 1 else names)
    return PartitionSpec(*fitted)


def variable_sharding(
    variable: nnx.Variable,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = DEFAULT_LOGICAL_AXIS_RULES,
) -> NamedSharding:
    """The NamedSharding of one variable from its logical names (leading unnamed axes replicate)."""
    shape = variable.get_value().shape
    names = tuple(variable.get_metadata().get("out_sharding") or ())
    names = (None,) * (len(shape) - len(names)) + names
    return NamedSharding(mesh, fit_spec(logical_to_mesh_spec(names, rules), shape, mesh))


def state_shardings(
    state: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = DEFAULT_LOGICAL_AXIS_RULES,
) -> Any:
    """NamedShardings for every variable of an `nnx.State` (same tree), from its logical names and `rules`."""
    return jax.tree.map(
        lambda variable: variable_sharding(variable, mesh, rules),
        state,
        is_leaf=lambda leaf: isinstance(leaf, nnx.Variable),
    )


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
    """`with_sharding_constraint` by logical names when a mesh is set (`jax.set_mesh`); identity otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_mesh_spec(names)
    spec = PartitionSpec(*(_keep_axes_in(mesh.axis_names, axis) for axis in spec))
    return jax.lax.with_sharding_constraint(x, spec)


def _keep_axes_in(mesh_axes: Sequence[str], axis: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
    if axis is None:
        return None
    kept = tuple(a for a in ((axis,) if isinstance(axis, str) else axis) if a in mesh_axes)
    return None if not kept else kept[0] if len(kept) == 1 else kept
