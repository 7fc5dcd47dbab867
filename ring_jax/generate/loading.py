"""A model and its tokenizer from a training workdir or an HF checkpoint directory."""

from __future__ import annotations

import os

from ring_jax.data.tokenizers import Tokenizer, make_tokenizer
from ring_jax.model import RingLinearModel

HF_TOKENIZER_FILE = "tokenizer.json"


def _workdir_tokenizer(spec: str, workdir: str) -> str:
    """The training config's `data.tokenizer`: 'bytes', or a tokenizer.json path as given or under the workdir."""
    if spec == "bytes" or os.path.isfile(spec):
        return spec
    beside = os.path.join(workdir, spec)
    if os.path.isfile(beside):
        return beside
    raise FileNotFoundError(f"{workdir}: its data.tokenizer {spec!r} was not found (pass --tokenizer PATH)")


def load_model_and_tokenizer(
    *,
    workdir: str | None = None,
    hf: str | None = None,
    step: int | None = None,
    dtype: str | None = None,
    tokenizer: str | None = None,
) -> tuple[RingLinearModel, Tokenizer]:
    """Exactly one of `workdir` (a `train.py` workdir: latest complete checkpoint, or `step`) and `hf` (an HF
    Ring-linear directory). dtype: compute dtype (a workdir keeps its fp32 master weights; HF weights are cast).
    tokenizer: 'bytes' or a tokenizer.json path (default: the workdir's `data.tokenizer`, or HF_DIR/tokenizer.json).
    """
    if (workdir is None) == (hf is None):
        raise ValueError("give exactly one of workdir (a training run) and hf (an HF checkpoint directory)")
    if workdir is not None:
        from ring_jax.train.checkpoint import restore_model

        model, config = restore_model(workdir, step, overrides={"dtype": dtype} if dtype else None)
        spec = tokenizer or _workdir_tokenizer(config.data.tokenizer, workdir)
    else:
        from ring_jax.convert import from_hf

        if step is not None:
            raise ValueError("step selects a training checkpoint: it does not apply to an HF directory")
        spec = tokenizer or os.path.join(hf, HF_TOKENIZER_FILE)
        if spec != "bytes" and not os.path.isfile(spec):
            raise FileNotFoundError(f"{hf}: no {HF_TOKENIZER_FILE} (pass --tokenizer: 'bytes' or a tokenizer.json)")
        model = from_hf(hf, dtype=dtype, progress=False)
    loaded = make_tokenizer(spec)
    if loaded.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {spec!r}: {loaded.vocab_size} tokens exceed the model's vocab_size {model.config.vocab_size}"
        )
    return model, loaded
