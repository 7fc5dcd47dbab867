"""Which kernels of a compiled, partitioned program run on gathered (whole-batch) operands.

A Pallas / Mosaic / tokamax / cuDNN kernel is a custom call the partitioner cannot split: if its operands are not
per-device shards (`ring_jax.sharding.per_shard`, the MoE shard_map), the compiler gathers them and every device
computes the whole batch. In the compiled HLO of a sharded step that shows as a kernel operand carrying a global
size: the global batch as a leading dimension, or the global token count (or, without expert parallelism, the
global number of routed token copies). Dropless expert parallelism sizes its receive buffers for the worst case
(every copy to one device), so with mesh.expert > 1 the grouped-matmul buffers legitimately have global size; only
their first rows are real.
"""

from __future__ import annotations

import re
from typing import NamedTuple

KERNEL_TARGETS = ("triton", "mosaic", "tpu_custom_call", "cudnn")  # substrings of custom_call_target
_CALL = re.compile(r"custom-call\((?P<operands>[^)]*)\).*?custom_call_target=\"(?P<target>[^\"]+)\"")
_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[(?P<dims>[0-9,]*)\]")


class KernelCall(NamedTuple):
    target: str
    operand_shapes: tuple[tuple[int, ...], ...]


def kernel_calls(hlo_text: str) -> list[KernelCall]:
    """Every kernel custom call in `hlo_text` (compiled HLO) with its operand shapes."""
    calls = []
    for match in _CALL.finditer(hlo_text):
        target = match["target"]
        if any(kind in target.lower() for kind in KERNEL_TARGETS):
            shapes = tuple(tuple(int(d) for d in m["dims"].split(",") if d) for m in _SHAPE.finditer(match["operands"]))
            calls.append(KernelCall(target, shapes))
    return calls


def gathered_kernel_calls(hlo_text: str, *, global_batch: int, seq_len: int, top_k: int,
                          expert_parallel: bool) -> list[KernelCall]:  # fmt: skip
    """The kernel calls with an operand of global size (see the module docstring); [] when all run per shard.

    Pick a global batch that no other dimension of the model equals (e.g. 3 × the number of batch shards)."""
    global_sizes = {global_batch * seq_len} | (set() if expert_parallel else {global_batch * seq_len * top_k})
    return [
        call for call in kernel_calls(hlo_text)
        if any((shape and shape[0] == global_batch) or global_sizes & set(shape) for shape in call.operand_shapes)
    ]  # fmt: skip
