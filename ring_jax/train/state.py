"""The typed train state, its construction and its shardings.

`TrainState` is what the jitted step carries and what Orbax saves (as a plain dict of its fields, the layout
checkpoints have always had, so older checkpoints still restore).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ring_jax import sharding
from ring_jax.config import ModelConfig
from ring_jax.errors import ConfigError
from ring_jax.layers.moe import ExpertBias, ExpertLoad
from ring_jax.model import RingLinearModel
from ring_jax.train.config import validate_training


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar, optimizer steps taken; params: nnx.State of Params (fp32 master weights,
    `model.param_dtype`); opt_state: optax state (AdamW moments, sharded like the params); expert_bias: nnx.State of
    the aux-loss-free routing biases (not trained by the optimizer); expert_load: tokens per expert of the last step
    (same tree as expert_bias); model_vars: every other model variable."""

    step: jax.Array
    params: Any
    opt_state: Any
    expert_bias: Any
    expert_load: Any
    model_vars: Any

    def to_checkpoint(self) -> dict[str, Any]:
        """The dict Orbax saves (field name -> subtree)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_checkpoint(cls, tree: dict[str, Any]) -> TrainState:
        return cls(**tree)


def train_state_shardings(abstract_state: TrainState, tx: optax.GradientTransformation,
                          mesh: jax.sharding.Mesh) -> TrainState:  # fmt: skip
    """NamedShardings for every leaf of the train state: model variables from their logical axis names
    (`sharding.state_shardings`), optimizer moments like their params, the rest replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    is_variable = lambda x: isinstance(x, nnx.Variable)
    placed = lambda state: jax.tree.map(lambda v, s: v.replace(s), state, sharding.state_shardings(state, mesh),
                                        is_leaf=is_variable)  # fmt: skip
    params = placed(abstract_state.params)
    opt_state = optax.tree_map_params(
        tx,
        lambda _, param_sharding: param_sharding,
        abstract_state.opt_state,
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=is_variable,
    )
    return TrainState(
        step=replicated,
        params=params,
        opt_state=opt_state,
        expert_bias=placed(abstract_state.expert_bias),
        expert_load=placed(abstract_state.expert_load),
        model_vars=placed(abstract_state.model_vars),
    )


class StateFactory:
    """Builds the model graph, the abstract train state, its shardings, and the initialised state."""

    def __init__(self, model_config: ModelConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                 *, seed: int):  # fmt: skip
        self.model_config = model_config
        self.tx = tx
        self.mesh = mesh
        self._seed = seed
        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(self._new_model)
        self.graphdef = nnx.graphdef(abstract_model)
        self.abstract_state = jax.eval_shape(self._init)
        self.shardings = train_state_shardings(self.abstract_state, tx, mesh)

    def _new_model(self) -> RingLinearModel:
        return RingLinearModel(self.model_config, rngs=nnx.Rngs(self._seed))

    def _init(self) -> TrainState:
        with nnx.use_eager_sharding(False):
            model = self._new_model()
        _, params, expert_bias, expert_load, model_vars = nnx.split(model, nnx.Param, ExpertBias, ExpertLoad, ...)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            expert_bias=expert_bias,
            expert_load=expert_load,
            model_vars=model_vars,
        )

    def init(self) -> TrainState:
        """Fresh state, created directly in its sharded layout."""
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init, out_shardings=self.shardings)()

    def from_params(self, params: Any, expert_bias: Any) -> TrainState:
        """A fresh train state (step 0, new optimizer moments, zero expert loads) around given parameters and expert
        biases (e.g. another run's or a converted checkpoint's), placed in this factory's shardings."""
        abstract = self.abstract_state
        zeros = lambda tree: jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), tree)  # noqa: E731

        def build(params: Any, expert_bias: Any) -> TrainState:
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                              expert_bias=expert_bias, expert_load=zeros(abstract.expert_load),
                              model_vars=zeros(abstract.model_vars))  # fmt: skip

        with jax.set_mesh(self.mesh):
            return jax.jit(build, in_shardings=(self.shardings.params, self.shardings.expert_bias),
                           out_shardings=self.shardings)(params, expert_bias)  # fmt: skip

    def abstract_with_shardings(self) -> TrainState:
        """ShapeDtypeStructs carrying the target shardings (the Orbax restore target)."""
        return jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            self.abstract_state,
            self.shardings,
        )

    def batch_sharding(self) -> NamedSharding:
        """[batch, seq] batches: rows split over the mesh axes of the activations' batch dimension."""
        return NamedSharding(self.mesh, PartitionSpec(sharding.batch_axes(self.mesh), None))


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
    """All config checks that do not need data: raises ConfigError naming the field."""
    validate_training(config)
    model_config = ModelConfig.from_config(config.model)
    if config.train.seq_len > model_config.max_position_embeddings:
        raise ConfigError(f"train.seq_len: {config.train.seq_len} exceeds model.max_position_embeddings="
                          f"{model_config.max_position_embeddings}")
    mesh = sharding.make_mesh(config.mesh, use_all=True)
    if model_config.num_experts % mesh.shape["expert"]:
        raise ConfigError(f"mesh.expert: {mesh.shape['expert']} devices cannot share model.num_experts="
                          f"{model_config.num_experts} experts evenly")
    batch_shards = sharding.batch_shards(mesh)
    micro_batch = config.train.batch_size // config.train.grad_accum_steps
    if micro_batch % batch_shards:
        raise ConfigError(f"train.batch_size: the micro-batch of {micro_batch} rows (batch_size / grad_accum_steps) "
                          f"must be divisible by the {batch_shards} batch shards of the mesh "
                          f"({' * '.join(sharding.batch_axes(mesh))})")
    if batch_shards % jax.process_count():
        # Each process loads its own rows (grain ShardByJaxProcess): the batch must be split across processes,
        # never replicated over them, or the "replicas" would hold different data.
        raise ConfigError(f"mesh: the {batch_shards} batch shards must be a multiple of the "
                          f"{jax.process_count()} processes (each process reads different batch rows)")
    return model_config
