"""Logical axis names and the one table that maps them to mesh axes.

Every parameter carries logical axis names (flax `out_sharding` metadata) and activations are constrained with
`constrain(x, names)`. A mesh built from the config (`data`, `fsdp`, `expert`, `tensor`) gives them meaning through
`DEFAULT_LOGICAL_AXIS_RULES`; with no mesh in context the constraints are no-ops, so the same code runs on one CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ring_jax.errors import ConfigError

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
    ("activation_batch", ("data", "fsdp", "expert")),  # expert too: attention runs on its own tokens per device
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_tokens", ("data", "fsdp", "expert")),
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
        raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
    if -1 in sizes:
        known = -math.prod(sizes)
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes (product {known})")
        sizes[sizes.index(-1)] = num_devices // known
    return tuple(sizes)


def make_mesh(
    sizes: Mapping[str, int] | Sequence[int] | Any,
    devices: Sequence[jax.Device] | None = None,
    *,
    use_all: bool = False,
) -> Mesh:
    """A mesh over MESH_AXES with Auto axis types (sharding propagates; shard_map islands where needed).

    sizes: per-axis sizes in MESH_AXES order, or by name (a dict or the config's `mesh` section; missing names are
    1); one size may be -1 (the rest). The mesh takes the first prod(sizes) of `devices` (default: all);
    use_all=True (training) requires it to cover all of them. Raises ConfigError ("mesh: ...").
    """
    if not isinstance(sizes, Sequence):
        named = dict(sizes.to_dict() if hasattr(sizes, "to_dict") else sizes)
        unknown = set(named) - set(MESH_AXES)
        if unknown:
            raise ConfigError(f"mesh: unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
        sizes = [named.get(axis, 1) for axis in MESH_AXES]
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_sizes(sizes, len(devices))
    needed = math.prod(sizes)
    named_sizes = dict(zip(MESH_AXES, sizes, strict=True))
    if needed > len(devices) or needed <= 0 or (use_all and needed != len(devices)):
        raise ConfigError(f"mesh: axis sizes {named_sizes} need {needed} devices but {len(devices)} are available")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices[:needed])


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split the activations' batch dimension (`activation_batch` in the rules table)."""
    return dividing_axes("activation_batch", (), mesh)


def dividing_axes(name: str, dims: Sequence[int], mesh: Any) -> tuple[str, ...]:
    """The mesh axes (present in `mesh`) the rules give logical `name`: the longest prefix of them whose size
    product divides every dimension in `dims`."""
    target = dict(DEFAULT_LOGICAL_AXIS_RULES).get(name)
    axes = tuple(a for a in ((target,) if isinstance(target, str) else target or ()) if a in mesh.axis_names)
    while axes and any(dim % math.prod(mesh.shape[a] for a in axes) for dim in dims):
        axes = axes[:-1]
    return axes


def batch_shards(mesh: Mesh) -> int:
    """Into how many pieces a batch is split (a global batch must be divisible by it)."""
    return math.prod(mesh.shape[axis] for axis in batch_axes(mesh))


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


def per_shard(fn: Callable[..., Any], in_names: Sequence[LogicalNames | None], out_names: Any) -> Callable[..., Any]:
    """`fn` run on each device's shard of its operands: `jax.shard_map` over every axis of the current mesh.

    Kernels (Pallas, Mosaic, tokamax custom calls) are opaque to the compiler's partitioner, which would otherwise
    gather their operands and run the whole batch on every device. Wrapped, each device runs the kernel on its own
    rows / heads, so `fn` must be independent across the sharded dimensions (no collectives are added).

    in_names: per positional argument, its logical axis names, or None for an argument every device gets whole
    (a scalar, a small table). Arguments that are None or not arrays pass through unchanged. out_names: a pytree
    matching fn's output, of logical-name tuples. A logical name is sharded over the mesh axes the rules give it,
    as far as their product divides every dimension carrying that name (else over fewer axes, down to none), so
    operands that share a name (q heads and kv heads) are always split alike. Without a mesh (or on one device)
    this is `fn` itself.
    """

    def wrapped(*args: Any) -> Any:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return fn(*args)
        is_operand = [isinstance(a, jax.Array) and names is not None for a, names in zip(args, in_names, strict=True)]
        dims_of: dict[str, list[int]] = {}
        for arg, names, operand in zip(args, in_names, is_operand, strict=True):
            for name, dim in zip(names, arg.shape, strict=True) if operand else ():
                if name is not None:
                    dims_of.setdefault(name, []).append(dim)
        axes_of = {name: dividing_axes(name, dims, mesh) for name, dims in dims_of.items()}
        spec_of = lambda names: _spec_from_axes(names, axes_of)  # noqa: E731
        in_specs = tuple(spec_of(names) if operand else PartitionSpec()
                         for names, operand in zip(in_names, is_operand, strict=True))  # fmt: skip
        out_specs = jax.tree.map(spec_of, out_names, is_leaf=_is_names)

        def body(*operands: Any) -> Any:
            it = iter(operands)
            return fn(*(next(it) if operand else arg for arg, operand in zip(args, is_operand, strict=True)))

        operands = tuple(arg for arg, operand in zip(args, is_operand, strict=True) if operand)
        in_specs = tuple(spec for spec, operand in zip(in_specs, is_operand, strict=True) if operand)
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*operands)

    return wrapped


def _is_names(x: Any) -> bool:
    return isinstance(x, tuple) and all(name is None or isinstance(name, str) for name in x)


def _spec_from_axes(names: LogicalNames, axes_of: Mapping[str, tuple[str, ...]]) -> PartitionSpec:
    used: set[str] = set()
    spec = []
    for name in names:
        axes = tuple(a for a in axes_of.get(name, ()) if a not in used) if name is not None else ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)
