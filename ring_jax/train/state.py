"""Mesh, train-state construction and shardings.

The train state is a plain dict pytree (what Orbax saves):
  step        int32 scalar          optimizer steps taken
  params      nnx.State of Params   fp32 master weights (model.param_dtype)
  opt_state   optax state           AdamW moments, sharded like the params
  expert_bias nnx.State             aux-loss-free routing biases (not trained by the optimizer)
  expert_load nnx.State             tokens per expert of the last step (same tree as expert_bias)
  model_vars  nnx.State             every other variable
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ring_jax import sharding
from ring_jax.config import ConfigError, ModelConfig
from ring_jax.layers.moe import ExpertBias, ExpertLoad
from ring_jax.model import RingLinearModel
from ring_jax.sharding import MESH_AXES
from ring_jax.train.config import validate_training

BATCH_SPEC = PartitionSpec(("data", "fsdp"), None)  # [batch, seq] batches split over data-parallel axes


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Axis sizes for MESH_AXES; one axis may be -1 (= the remaining devices)."""
    try:
        sizes = sharding.resolve_mesh_sizes([mesh_config[axis] for axis in MESH_AXES], num_devices)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: axis sizes {dict(zip(MESH_AXES, sizes, strict=True))} need "
                            f"{math.prod(sizes)} devices but {num_devices} are available")
    return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    return sharding.make_mesh(mesh_shape(mesh_config, len(devices)), devices)


def state_shardings(abstract_state: dict[str, Any], tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """NamedShardings for every leaf of the train state, from the params' logical axis names."""

    def of_variable(variable: nnx.Variable):
        return variable.replace(sharding.variable_sharding(variable, mesh))

    is_variable = lambda x: isinstance(x, nnx.Variable)
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.tree.map(of_variable, abstract_state["params"], is_leaf=is_variable)
    opt_state = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state["opt_state"],
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=is_variable,
    )
    return {
        "step": replicated,
        "params": params,
        "opt_state": opt_state,
        **{key: jax.tree.map(of_variable, abstract_state[key], is_leaf=is_variable)
           for key in ("expert_bias", "expert_load", "model_vars")},
    }


class StateFactory:
    """Builds the model graph, the abstract train state, its shardings, and the initialised state."""

    def __init__(self, model_config: ModelConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                 *, seed: int, remat_policy: str):
        self.model_config = model_config
        self.tx = tx
        self.mesh = mesh
        self._seed = seed
        self._remat_policy = remat_policy
        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(self._new_model)
        self.graphdef = nnx.graphdef(abstract_model)
        self.abstract_state = jax.eval_shape(self._init)
        self.shardings = state_shardings(self.abstract_state, tx, mesh)

    def _new_model(self) -> RingLinearModel:
        return RingLinearModel(self.model_config, rngs=nnx.Rngs(self._seed), remat_policy=self._remat_policy)

    def _init(self) -> dict[str, Any]:
        with nnx.use_eager_sharding(False):
            model = self._new_model()
        _, params, expert_bias, expert_load, model_vars = nnx.split(model, nnx.Param, ExpertBias, ExpertLoad, ...)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": self.tx.init(params),
            "expert_bias": expert_bias,
            "expert_load": expert_load,
            "model_vars": model_vars,
        }

    def init(self) -> dict[str, Any]:
        """Fresh state, created directly in its sharded layout."""
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init, out_shardings=self.shardings)()

    def abstract_with_shardings(self) -> dict[str, Any]:
        """ShapeDtypeStructs carrying the target shardings (the Orbax restore target)."""
        return jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            self.abstract_state,
            self.shardings,
        )

    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, BATCH_SPEC)


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
    """All config checks that do not need data: raises ConfigError naming the field."""
    validate_training(config)
    model_config = ModelConfig.from_config(config.model)
    if config.train.seq_len > model_config.max_position_embeddings:
        raise ConfigError(f"train.seq_len: {config.train.seq_len} exceeds model.max_position_embeddings="
                          f"{model_config.max_position_embeddings}")
    shape = dict(zip(("data", "fsdp", "expert", "tensor"), mesh_shape(config.mesh, jax.device_count()),
                     strict=True))
    batch_shards = shape["data"] * shape["fsdp"]
    micro_batch = config.train.batch_size // config.train.grad_accum_steps
    if micro_batch % batch_shards:
        raise ConfigError(f"train.batch_size: the micro-batch of {micro_batch} rows (batch_size / grad_accum_steps) "
                          f"must be divisible by mesh.data * mesh.fsdp = {batch_shards}")
    if batch_shards % jax.process_count():
        # Each process loads its own rows (grain ShardByJaxProcess): the batch must be split across processes,
        # never replicated over them, or the "replicas" would hold different data.
        raise ConfigError(f"mesh: mesh.data * mesh.fsdp = {batch_shards} must be a multiple of the "
                          f"{jax.process_count()} processes (each process reads different batch rows)")
    return model_config
