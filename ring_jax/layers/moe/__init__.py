"""Sparse MoE: sigmoid router with expert bias and group-limited top-k, dropless dispatch, shared expert."""

from ring_jax.layers.moe.block import MoE, RouterStats
from ring_jax.layers.moe.dispatch import moe_dispatch_combine
from ring_jax.layers.moe.router import ExpertBias, ExpertLoad, Router, RouterOutput, select_experts

__all__ = [
    "ExpertBias",
    "ExpertLoad",
    "MoE",
    "Router",
    "RouterOutput",
    "RouterStats",
    "moe_dispatch_combine",
    "select_experts",
]
