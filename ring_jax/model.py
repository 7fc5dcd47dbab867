"""The Ring-linear hybrid model: decoder layers, the scanned layer cycle, the optional MTP head, the hybrid cache.

Layer plan: a cycle is `layer_group_size` consecutive MoE layers, G−1 lightning + 1 softmax. Layers
before the first full MoE cycle (the dense prefix and the rest of its cycle) and any softmax tail after the last full
cycle are unrolled (`pre_layers`, `post_layers`); the full cycles share one module whose weights are stacked on a
leading [num_cycles] axis (`cycles`) and run under `jax.lax.scan` (or a Python loop with `scan_layers=False`: same
weights, same results, easier to debug).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.layers.attention import KVCache, LayerInputs, SoftmaxAttention, check_cache_room
from ring_jax.layers.lightning import LightningAttention
from ring_jax.layers.linear import Embed, Linear
from ring_jax.layers.mlp import SwiGLU
from ring_jax.layers.moe import ExpertLoad, MoE, RouterStats
from ring_jax.layers.norms import RMSNorm
from ring_jax.layers.rope import rope_tables
from ring_jax.remat import POLICIES as REMAT
from ring_jax.sharding import constrain
from ring_jax.token_checks import check_tokens

LayerCache = jax.Array | KVCache | None  # lightning state [batch, heads, head_dim, head_dim] fp32, or a KV cache


class LayerPlan(NamedTuple):
    """Which HF layer indices are unrolled before the cycles, scanned, and unrolled after."""

    pre: tuple[int, ...]
    first_cycle_layer: int
    num_cycles: int
    post: tuple[int, ...]


def layer_plan(config: ModelConfig) -> LayerPlan:
    group, num_layers = config.layer_group_size, config.num_hidden_layers
    first = -(-config.first_k_dense_replace // group) * group  # first cycle boundary holding only MoE layers
    num_cycles = max((num_layers // group) * group - first, 0) // group
    end = first + num_cycles * group
    if num_cycles == 0:
        return LayerPlan(tuple(range(num_layers)), num_layers, 0, ())
    return LayerPlan(tuple(range(first)), first, num_cycles, tuple(range(end, num_layers)))


def layer_locations(config: ModelConfig) -> list[tuple[str, int] | tuple[str, int, int]]:
    """Per HF layer index: ("pre", i) | ("cycle", cycle, position_in_cycle) | ("post", i)."""
    plan = layer_plan(config)
    group = config.layer_group_size
    locations: list[tuple[str, int] | tuple[str, int, int]] = [("pre", i) for i in range(len(plan.pre))]
    locations += [("cycle", c, j) for c in range(plan.num_cycles) for j in range(group)]
    locations += [("post", i) for i in range(len(plan.post))]
    return locations


class DecoderLayer(nnx.Module):
    """h = x + Attn(RMSNorm(x)); out = h + MLP(RMSNorm(h)); attention and MLP kinds fixed at construction."""

    def __init__(self, config: ModelConfig, *, softmax: bool, moe: bool, rngs: nnx.Rngs):
        eps, param_dtype = config.rms_norm_eps, config.weight_dtype
        self.softmax = softmax
        self.input_norm = RMSNorm(config.hidden_size, eps=eps, param_dtype=param_dtype)
        self.attention = (SoftmaxAttention if softmax else LightningAttention)(config, rngs=rngs)
        self.post_attention_norm = RMSNorm(config.hidden_size, eps=eps, param_dtype=param_dtype)
        self.mlp = (
            MoE(config, rngs=rngs)
            if moe
            else SwiGLU(
                config.hidden_size,
                config.intermediate_size,
                dtype=config.compute_dtype,
                param_dtype=param_dtype,
                rngs=rngs,
                fp8=config.fp8,
            )
        )

    def __call__(
        self, x: jax.Array, inputs: LayerInputs, layer_index: jax.Array | int, cache: LayerCache = None
    ) -> tuple[jax.Array, LayerCache, RouterStats | None]:
        """x [batch, seq, hidden] -> (x, updated cache, router stats of an MoE layer or None)."""
        normed = self.input_norm(x)
        if self.softmax:
            attended, cache = self.attention(normed, inputs, cache)
        else:
            attended, cache = self.attention(normed, inputs, layer_index, cache)
        x = x + attended
        normed = self.post_attention_norm(x)
        stats = None
        if isinstance(self.mlp, MoE):
            mlp_out, stats = self.mlp(normed, inputs.token_mask)
        else:
            mlp_out = self.mlp(normed)
        x = constrain(x + mlp_out, ("activation_batch", "activation_length", "activation_embed"))
        return x, cache, stats


class LayerCycle(nnx.Module):
    """G−1 lightning MoE layers followed by one softmax MoE layer (G softmax layers with attention_layout="softmax")."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        # Cycles start at multiples of G, so position j in a cycle has layer j's attention kind.
        self.layers = nnx.List(
            [
                DecoderLayer(config, softmax=config.is_softmax_layer(j), moe=True, rngs=rngs)
                for j in range(config.layer_group_size)
            ]
        )

    def __call__(
        self, x: jax.Array, inputs: LayerInputs, layer_indices: jax.Array, caches: tuple[LayerCache, ...]
    ) -> tuple[jax.Array, tuple[LayerCache, ...], tuple[RouterStats, ...], tuple[jax.Array, ...]]:
        """layer_indices [group] int32 (HF indices of this cycle's layers; they set the lightning decay).

        Returns x, the updated caches, router stats, and the residual stream after each layer."""
        new_caches, stats, layer_outputs = [], [], []
        for j, layer in enumerate(self.layers):
            x, cache, layer_stats = layer(x, inputs, layer_indices[j], caches[j])
            new_caches.append(cache)
            stats.append(layer_stats)
            layer_outputs.append(x)
        return x, tuple(new_caches), tuple(stats), tuple(layer_outputs)


class MTPLayer(nnx.Module):
    """Multi-token prediction block: z = W[enorm(embed(next ids)) ‖ hnorm(h)], a softmax MoE layer,
    a final norm; logits come from the shared lm_head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        eps, param_dtype, hidden = config.rms_norm_eps, config.weight_dtype, config.hidden_size
        self.embed_norm = RMSNorm(hidden, eps=eps, param_dtype=param_dtype)
        self.hidden_norm = RMSNorm(hidden, eps=eps, param_dtype=param_dtype)
        self.projection = Linear(
            2 * hidden,
            hidden,
            names=(None, "embed"),
            dtype=config.compute_dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            fp8=config.fp8,
        )
        self.layer = DecoderLayer(config, softmax=True, moe=config.num_experts > 0, rngs=rngs)
        self.final_norm = RMSNorm(hidden, eps=eps, param_dtype=param_dtype)

    def __call__(
        self, hidden: jax.Array, next_embeddings: jax.Array, inputs: LayerInputs
    ) -> tuple[jax.Array, jax.Array]:
        """hidden, next_embeddings [batch, seq, hidden] -> (block output, normed output for the lm_head)."""
        joined = jnp.concatenate([self.embed_norm(next_embeddings), self.hidden_norm(hidden)], axis=-1)
        out, _, _ = self.layer(self.projection(joined), inputs, 0)
        return out, self.final_norm(out)


class ModelCache(NamedTuple):
    """The hybrid cache: per-layer caches of the pre layers, the stacked cycles ([num_cycles, ...] leaves, one
    entry per position in the cycle) and the post layers; `length` int32 scalar, the slots already filled (the
    same for every row); `left_padding` [batch] int32, the slots of each row that hold left padding."""

    pre: tuple[LayerCache, ...]
    cycles: tuple[LayerCache, ...]
    post: tuple[LayerCache, ...]
    length: jax.Array
    left_padding: jax.Array

    @property
    def max_length(self) -> int:
        """Slots of the KV caches (every configuration has at least one softmax layer)."""
        kv = next(c for c in (*self.pre, *self.cycles, *self.post) if isinstance(c, KVCache))
        return kv.keys.shape[-3]


class ModelOutput(NamedTuple):
    """logits [batch, seq, vocab] fp32 (None with compute_logits=False); hidden_states [batch, seq, hidden] (after
    the final norm: the lm_head input); cache (or None); expert_load [num_moe_layers, num_experts] fp32 in HF layer
    order; router_z_loss scalar fp32 (mean over MoE layers); mtp_hidden_states: one [batch, seq, hidden] lm_head
    input per MTP depth d (position t predicts token t + d + 1); mtp_logits: their [batch, seq, vocab] fp32 logits
    (empty with compute_logits=False); layer_states: with output_layer_states=True, the residual stream
    [batch, seq, hidden] after each decoder layer in HF layer order (else empty)."""

    logits: jax.Array | None
    hidden_states: jax.Array
    cache: ModelCache | None
    expert_load: jax.Array
    router_z_loss: jax.Array
    mtp_hidden_states: tuple[jax.Array, ...]
    mtp_logits: tuple[jax.Array, ...]
    layer_states: tuple[jax.Array, ...] = ()


def left_padding_segments(left_padding: jax.Array, seq: int) -> jax.Array:
    """[batch] pad counts -> [batch, seq] int32 segment ids, 0 on the left padding and 1 on the tokens: the
    no-cache `forward` of a left-padded batch then computes each row as if its prompt were alone."""
    return (jnp.arange(seq)[None, :] >= jnp.asarray(left_padding)[:, None]).astype(jnp.int32)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """[batch, seq] positions that restart at 0 where the segment id changes."""
    seq = segment_ids.shape[1]
    index = jnp.arange(seq)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


class RingLinearModel(nnx.Module):
    """Ring-linear causal LM. `model(tokens)` -> logits; `model.forward(...)` -> ModelOutput."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.plan = layer_plan(config)
        dtype, param_dtype = config.compute_dtype, config.weight_dtype
        self.embed = Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def make_layer(index: int) -> DecoderLayer:
            return DecoderLayer(
                config, softmax=config.is_softmax_layer(index), moe=config.is_moe_layer(index), rngs=rngs
            )

        self.pre_layers = nnx.List([make_layer(i) for i in self.plan.pre])

        @nnx.split_rngs(splits=max(self.plan.num_cycles, 1))
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_cycles(cycle_rngs: nnx.Rngs) -> LayerCycle:
            return LayerCycle(config, rngs=cycle_rngs)

        self.cycles = nnx.data(make_cycles(rngs) if self.plan.num_cycles else None)
        self.post_layers = nnx.List([make_layer(i) for i in self.plan.post])
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = Linear(
            config.hidden_size,
            config.vocab_size,
            names=("embed", "vocab"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.mtp_layers = nnx.List([MTPLayer(config, rngs=rngs) for _ in range(config.num_nextn_predict_layers)])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, seq] int -> logits [batch, seq, vocab] fp32."""
        return self.forward(tokens).logits

    # ----------------------------------------------------------------------------------------------------------
    def init_cache(
        self,
        batch: int,
        max_length: int,
        kv_dtype: jnp.dtype | None = None,
        *,
        left_padding: jax.Array | None = None,
    ) -> ModelCache:
        """An empty hybrid cache: fp32 lightning states, KV caches of `max_length` tokens (compute dtype).

        left_padding [batch] int: how many leading tokens of each row's prompt are padding (left-padded batches of
        prompts of different lengths). Padding enters no lightning state and no attention, and positions start at
        0 at each row's first real token, so a padded row computes what the same prompt computes alone."""
        if left_padding is None:
            left_padding = jnp.zeros((batch,), jnp.int32)
        left_padding = jnp.asarray(left_padding, jnp.int32)
        if left_padding.shape != (batch,):
            raise ValueError(f"left_padding: expected shape ({batch},), got {left_padding.shape}")
        config = self.config
        kv_dtype = kv_dtype or config.compute_dtype
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim

        def layer_cache(index: int, leading: tuple[int, ...] = ()) -> LayerCache:
            if config.is_softmax_layer(index):
                shape = (*leading, batch, max_length, kv_heads, head_dim)
                return KVCache(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype))
            return jnp.zeros((*leading, batch, heads, head_dim, head_dim), jnp.float32)

        plan = self.plan
        cycles = tuple(
            layer_cache(plan.first_cycle_layer + j, (plan.num_cycles,))
            for j in range(config.layer_group_size if plan.num_cycles else 0)
        )
        return ModelCache(
            pre=tuple(layer_cache(i) for i in plan.pre),
            cycles=cycles,
            post=tuple(layer_cache(i) for i in plan.post),
            length=jnp.zeros((), jnp.int32),
            left_padding=left_padding,
        )

    def forward(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: ModelCache | None = None,
        token_mask: jax.Array | None = None,
        compute_logits: bool = True,
        output_layer_states: bool = False,
    ) -> ModelOutput:
        """tokens [batch, seq] int; positions [batch, seq] (default: restart per segment, or continue the cache
        from each row's first real token); segment_ids [batch, seq] for packed documents (attention and lightning
        state never cross a boundary; without a cache, a left-padded batch is segment 0 for the padding and 1 for
        the prompt: `left_padding_segments`); token_mask [batch, seq] bool, False for padding that must not count
        in the expert load (bias update); the cache's left padding is excluded too. compute_logits=False skips
        the lm_head (training takes hidden states into a fused lm_head + loss); output_layer_states=True returns
        the residual stream after every layer (`layer_states`, for layer-by-layer comparisons)."""
        config = self.config
        check_tokens(tokens, config, 0 if cache is None else cache.length)
        batch, seq = tokens.shape
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packed training sequences) cannot be combined with a cache")
        cache_length = cache.length if cache is not None else 0
        left_padding = cache.left_padding if cache is not None else None
        if cache is not None:
            check_cache_room(cache.max_length, cache_length, seq)
            slots = jnp.arange(seq)[None, :] + cache_length
            real = slots >= left_padding[:, None]
            token_mask = real if token_mask is None else token_mask & real
        if positions is None:
            if segment_ids is not None:
                positions = positions_from_segments(segment_ids)
            elif cache is not None:
                positions = jnp.maximum(slots - left_padding[:, None], 0)
            else:
                positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        cos, sin = rope_tables(positions, config)
        inputs = LayerInputs(cos, sin, segment_ids, cache_length, token_mask, left_padding)
        x = self.embed(tokens)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))

        stats: list[RouterStats] = []
        layer_states: list[jax.Array] | None = [] if output_layer_states else None
        x, pre_caches = self._run_unrolled(
            self.pre_layers, self.plan.pre, x, inputs, None if cache is None else cache.pre, stats, layer_states
        )
        cycle_caches: tuple[LayerCache, ...] = ()
        if self.cycles is not None:
            x, cycle_caches = self._run_cycles(x, inputs, None if cache is None else cache.cycles, stats, layer_states)
        x, post_caches = self._run_unrolled(
            self.post_layers, self.plan.post, x, inputs, None if cache is None else cache.post, stats, layer_states
        )

        hidden = self.final_norm(x)
        mtp_hidden = self._mtp_hidden_states(x, tokens, inputs) if cache is None else ()
        logits_of = lambda h: self.lm_head(h, out_dtype=jnp.float32)
        new_cache = None
        if cache is not None:
            new_cache = ModelCache(pre_caches, cycle_caches, post_caches, cache.length + seq, cache.left_padding)
        return ModelOutput(
            logits=logits_of(hidden) if compute_logits else None,
            hidden_states=hidden,
            cache=new_cache,
            expert_load=jnp.stack([s.expert_load for s in stats]) if stats else jnp.zeros((0, config.num_experts)),
            router_z_loss=jnp.mean(jnp.stack([s.z_loss for s in stats])) if stats else jnp.zeros(()),
            mtp_hidden_states=mtp_hidden,
            mtp_logits=tuple(map(logits_of, mtp_hidden)) if compute_logits else (),
            layer_states=tuple(layer_states or ()),
        )

    # ----------------------------------------------------------------------------------------------------------
    def _remat(self, fn: Any) -> Any:
        name = self.config.remat_policy
        return fn if name == "none" else jax.checkpoint(fn, policy=REMAT[name])

    def _run_unrolled(
        self,
        layers: nnx.List,
        indices: tuple[int, ...],
        x: jax.Array,
        inputs: LayerInputs,
        caches: tuple[LayerCache, ...] | None,
        stats: list[RouterStats],
        layer_states: list[jax.Array] | None,
    ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        new_caches = []
        for position, (layer, index) in enumerate(zip(layers, indices, strict=True)):
            cache = caches[position] if caches is not None else None
            graphdef, state = nnx.split(layer)

            def run(state: Any, x: jax.Array, cache: LayerCache, graphdef: Any = graphdef, index: int = index):
                layer = nnx.merge(graphdef, state)
                out = layer(x, inputs, index, cache)
                return out, nnx.state(layer, ExpertLoad)

            (x, cache, layer_stats), new_state = self._remat(run)(state, x, cache)
            nnx.update(layer, new_state)
            new_caches.append(cache)
            if layer_stats is not None:
                stats.append(layer_stats)
            if layer_states is not None:
                layer_states.append(x)
        return x, tuple(new_caches)

    def _run_cycles(
        self,
        x: jax.Array,
        inputs: LayerInputs,
        caches: tuple[LayerCache, ...] | None,
        stats: list[RouterStats],
        layer_states: list[jax.Array] | None,
    ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        plan, group = self.plan, self.config.layer_group_size
        graphdef, state = nnx.split(self.cycles)
        layer_indices = plan.first_cycle_layer + jnp.arange(plan.num_cycles * group).reshape(plan.num_cycles, group)

        # The stacked caches ride in the carry and each cycle writes its own entry back (dynamic_update_index):
        # XLA then updates them in place. As scan inputs and outputs they would need a second buffer of their full
        # size, which is what keeps a long KV cache from fitting.
        def body(carry: tuple[jax.Array, Any], scanned: tuple[Any, jax.Array, jax.Array]):
            x, all_caches = carry
            cycle_state, indices, position = scanned
            cycle = nnx.merge(graphdef, cycle_state)
            cycle_caches = (None,) * group
            if all_caches is not None:
                cycle_caches = jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, position, 0, False),
                                            all_caches)  # fmt: skip
            x, new_caches, cycle_stats, outputs = cycle(x, inputs, indices, cycle_caches)
            if all_caches is not None:
                all_caches = jax.tree.map(lambda leaf, new: jax.lax.dynamic_update_index_in_dim(leaf, new, position, 0),
                                          all_caches, new_caches)  # fmt: skip
            outputs = outputs if layer_states is not None else ()  # scan outputs are kept only when asked for
            return (x, all_caches), (cycle_stats, nnx.state(cycle, ExpertLoad), outputs)

        body = self._remat(body)
        positions = jnp.arange(plan.num_cycles)
        if self.config.scan_layers:
            (x, new_caches), (cycle_stats, new_state, outputs) = jax.lax.scan(
                body, (x, caches), (state, layer_indices, positions)
            )
        else:
            per_cycle = []
            for c in range(plan.num_cycles):
                scanned = jax.tree.map(lambda leaf, c=c: leaf[c], (state, layer_indices, positions))
                (x, caches), out = body((x, caches), scanned)
                per_cycle.append(out)
            new_caches = caches
            cycle_stats, new_state, outputs = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_cycle)
        nnx.update(self.cycles, new_state)
        # [num_cycles] stacked stats per position in the cycle -> HF layer order (cycle-major).
        for c in range(plan.num_cycles):
            stats.extend(RouterStats(*(leaf[c] for leaf in s)) for s in cycle_stats)
            if layer_states is not None:
                layer_states.extend(layer_output[c] for layer_output in outputs)
        return x, new_caches

    def _mtp_hidden_states(self, hidden: jax.Array, tokens: jax.Array, inputs: LayerInputs) -> tuple[jax.Array, ...]:
        lm_head_inputs = []
        for depth, mtp in enumerate(self.mtp_layers, start=1):
            next_tokens = jnp.roll(tokens, -depth, axis=1)  # the last `depth` positions have no target
            hidden, normed = mtp(hidden, self.embed(next_tokens), inputs)
            lm_head_inputs.append(normed)
        return tuple(lm_head_inputs)


def abstract_model(config: ModelConfig) -> RingLinearModel:
    """The model with ShapeDtypeStruct leaves (shapes, dtypes, sharding names): no memory is allocated."""
    return nnx.eval_shape(lambda: RingLinearModel(config, rngs=nnx.Rngs(0)))


def init_model(config: ModelConfig, seed: int = 0) -> RingLinearModel:
    """A randomly initialised model built by one jitted function on the default device: the weights are created
    where they live (a 33 GB bf16 Ring-mini never passes through host memory or eager per-leaf dispatch). The keys
    are XLA RngBitGenerator ("rbg") keys, which compile and run several times faster than threefry for a whole model
    (so the values differ from `RingLinearModel(config, rngs=nnx.Rngs(seed))`)."""
    graphdef = nnx.graphdef(abstract_model(config))
    rngs = lambda: nnx.Rngs(jax.random.key(seed, impl="rbg"))
    state = jax.jit(lambda: nnx.state(RingLinearModel(config, rngs=rngs())))()
    return nnx.merge(graphdef, state)
