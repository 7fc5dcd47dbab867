"""Kernels on gathered operands: the HLO reading (CPU, on HLO text) and the real check on 2+ GPUs (gpu-marked)."""

from __future__ import annotations

import jax
import pytest

from ring_jax.train.kernel_check import gathered_kernel_calls, kernel_calls

# Excerpt in the shape of compiled GPU HLO: a per-shard Triton kernel, a kernel fed a gathered [4, ...] batch, a
# cuBLAS GEMM (XLA's own, always partitioned) and a Mosaic grouped matmul on the global token copies.
HLO = """
  %custom-call.1 = (bf16[2,64,16,128]{3,2,1,0}, f32[2,16,128,128]{3,2,1,0}) custom-call(f32[16,16]{1,0} %p0, bf16[2,64,16,128]{3,2,1,0} %q), custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI
  %custom-call.2 = bf16[4,64,16,128]{3,2,1,0} custom-call(bf16[4,64,16,128]{3,2,1,0} %all-gather.3), custom_call_target="__gpu$xla.gpu.triton"
  %custom-call.3 = (bf16[256,128]{1,0}, s8[0]{0}) custom-call(bf16[256,64]{1,0} %a, bf16[64,128]{1,0} %b), custom_call_target="__cublas$gemm"
  %custom-call.4 = bf16[2048,512]{1,0} custom-call(bf16[2048,1024]{1,0} %x, bf16[16,1024,512]{2,1,0} %w, s32[16]{0} %g), custom_call_target="mosaic_gpu_v2"
"""  # noqa: E501


def test_kernel_calls_are_read_with_their_operand_shapes():
    calls = kernel_calls(HLO)
    assert [c.target for c in calls] == ["__gpu$xla.gpu.triton", "__gpu$xla.gpu.triton", "mosaic_gpu_v2"]
    assert calls[0].operand_shapes == ((16, 16), (2, 64, 16, 128))
    assert calls[2].operand_shapes == ((2048, 1024), (16, 1024, 512), (16,))


def test_gathered_operands_are_found():
    # Global batch 4 x 64 tokens, top-4 copies: 1024 tokens, 2048 copies... of which the grouped matmul sees all.
    found = gathered_kernel_calls(HLO, global_batch=4, seq_len=64, top_k=8, expert_parallel=False)
    assert [c.operand_shapes[0] for c in found] == [(4, 64, 16, 128), (2048, 1024)]
    # With expert parallelism the grouped-matmul buffers are worst-case sized by design: only the batch counts.
    found = gathered_kernel_calls(HLO, global_batch=4, seq_len=64, top_k=8, expert_parallel=True)
    assert [c.operand_shapes[0] for c in found] == [(4, 64, 16, 128)]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2, reason="needs 2 or more GPUs")
@pytest.mark.parametrize("mesh", [{"data": 2}, {"expert": 2}, {"fsdp": 2}])
def test_every_kernel_of_the_sharded_step_runs_per_shard(mesh):
    """GPU only: compile a small sharded train step with the GPU kernels and read its HLO."""
    from ring_jax.sharding import make_mesh
    from ring_jax.train.config import base_config
    from ring_jax.train.optim import make_optimizer
    from ring_jax.train.state import StateFactory, validate
    from ring_jax.train.step import abstract_batch, make_train_step

    config = base_config()
    config.model.update(num_hidden_layers=4, num_experts=16, dtype="bfloat16", vocab_size=4096)
    config.train.update(batch_size=6, seq_len=512, autotune_kernels=False)  # 6: no model dimension equals it
    config.mesh.update({**mesh, "data": mesh.get("data", 1)})
    devices = jax.devices()[:2]
    model_config = validate(config)
    factory = StateFactory(model_config, make_optimizer(config.optim, 10)[0], make_mesh(config.mesh, devices), seed=0)
    step = make_train_step(factory, config)
    with jax.set_mesh(factory.mesh):
        hlo = step.lower(factory.abstract_with_shardings(),
                         abstract_batch(6, 512, factory.batch_sharding())).compile().as_text()  # fmt: skip
    assert kernel_calls(hlo), "no kernel custom calls: the GPU kernels did not run"
    gathered = gathered_kernel_calls(hlo, global_batch=6, seq_len=512, top_k=model_config.num_experts_per_tok,
                                     expert_parallel=mesh.get("expert", 1) > 1)  # fmt: skip
    assert gathered == [], gathered
