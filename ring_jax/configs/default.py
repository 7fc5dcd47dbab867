"""A tiny Ring-linear (same architecture, toy sizes) that trains on 2 CPU cores in minutes on the embedded data."""

import ml_collections

from ring_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.update(
        vocab_size=272,  # byte tokenizer: 256 bytes + special tokens
        hidden_size=128,
        num_hidden_layers=9,  # layers 2, 5, 8 softmax; layer 0 dense; two scanned cycles (3–5, 6–8)
        layer_group_size=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        group_norm_size=2,
        intermediate_size=384,
        moe_intermediate_size=64,
        moe_shared_expert_intermediate_size=64,
        num_experts=16,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        # Same weights either way; on XLA:CPU the unrolled stack steps and compiles faster (BENCHMARKS.md, CPU).
        scan_layers=False,
    )
    # Training on the embedded synthetic data: 300 steps of 8 x 128 tokens; eval loss and exact-match accuracy on
    # held-out task examples every 100 steps.
    config.train.update(steps=300, batch_size=8, seq_len=128, log_every=10, eval_every=100)
    config.optim.update(learning_rate=3e-3, warmup_steps=20, bias_update_rate=1e-2)
    config.checkpoint.update(every_n_steps=100, keep=2)
    return config
