"""grain input pipeline: source -> process shard -> shuffle -> tokenize -> split -> pack -> batch.

Each batch is a dict of numpy arrays, all [rows, seq_len]:
  inputs      int32  token ids fed to the model
  targets     int32  next-token ids
  segment_ids int32  1, 2, ... per packed document; 0 = padding (attention and lightning state never cross)
  positions   int32  position within its document (restarts at 0 in each segment)
  loss_mask   float32 1 where the target is a real token the loss learns (fine-tuning records: only the completion,
              `ring_jax.data.sft`)
Documents are tokenized as [BOS] + ids + [EOS] (when the tokenizer has them); documents longer than
seq_len + 1 tokens are cut into windows that become separate segments.
"""

from __future__ import annotations

import grain
import jax
import ml_collections
import numpy as np

from ring_jax.data import heldout, sft, sources, synthetic
from ring_jax.data.sources import DataError
from ring_jax.data.tokenizers import Tokenizer, make_tokenizer


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def map(self, document: sources.Document) -> dict[str, np.ndarray]:
        tokens, learned = sft.encode(document, self._tokenizer)
        return {"tokens": tokens, "learned": learned}


class _SplitIntoWindows(grain.experimental.FlatMapTransform):
    """document {'tokens', 'learned'} [n] -> windows {'inputs', 'targets', 'loss_mask'} of at most seq_len
    next-token pairs."""

    max_fan_out = 2**31 - 1

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def flat_map(self, document: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        tokens, n = document["tokens"], self._seq_len
        inputs, targets, loss_mask = tokens[:-1], tokens[1:], document["learned"][1:]
        return [{"inputs": inputs[i:i + n], "targets": targets[i:i + n], "loss_mask": loss_mask[i:i + n]}
                for i in range(0, len(inputs), n)]  # fmt: skip


class _FromPacked(grain.transforms.Map):
    def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment_ids = packed["inputs_segment_ids"].astype(np.int32)
        return {
            "inputs": packed["inputs"].astype(np.int32),
            "targets": packed["targets"].astype(np.int32),
            "segment_ids": segment_ids,
            "positions": packed["inputs_positions"].astype(np.int32),
            "loss_mask": packed["loss_mask"].astype(np.float32) * (segment_ids > 0),
        }


class _PadOne(grain.transforms.Map):
    """Unpacked mode: one window per row, right-padded."""

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def map(self, window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(window["inputs"])
        pad = self._seq_len - n
        valid = np.concatenate([np.ones(n, np.int32), np.zeros(pad, np.int32)])
        return {
            "inputs": np.pad(window["inputs"], (0, pad)).astype(np.int32),
            "targets": np.pad(window["targets"], (0, pad)).astype(np.int32),
            "segment_ids": valid,
            "positions": np.concatenate([np.arange(n, dtype=np.int32), np.zeros(pad, np.int32)]),
            "loss_mask": np.pad(window["loss_mask"], (0, pad)).astype(np.float32),
        }


class _CheckVocab(grain.transforms.Map):
    def __init__(self, vocab_size: int, source: str):
        self._vocab_size = vocab_size
        self._source = source

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for key in ("inputs", "targets"):
            largest = int(batch[key].max())
            if largest >= self._vocab_size or int(batch[key].min()) < 0:
                raise DataError(f"data: token id {largest} in '{key}' from data.source={self._source!r} is "
                                f"outside [0, model.vocab_size={self._vocab_size})")
        return batch


def make_source(data_config: ml_collections.ConfigDict):
    """The random-access document source named by `data.source`, less its held-out documents (`heldout`)."""
    if data_config.source == "default":
        return synthetic.SyntheticSource(data_config.num_default_documents, seed=data_config.shuffle_seed)
    documents = sources.make_file_source(data_config.source, data_config.format, data_config.text_field)
    return heldout.training_documents(data_config, documents)


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, tokenizer_spec: str) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"data.tokenizer: {tokenizer_spec!r} has {tokenizer.vocab_size} tokens but "
                        f"model.vocab_size={vocab_size}; token ids would be out of range")


def make_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    seq_len: int,
    global_batch_size: int,
    vocab_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    held_out: bool = False,
) -> grain.IterDataset:
    """Infinite, deterministic IterDataset of this process's batches [global_batch / processes, seq_len]; with
    `held_out`, the batches of the held-out documents (`ring_jax.data.heldout`), read once in order.

    The documents are split into `data.num_shards` shards (0: one per process), each packed into its own rows:
    a process reads the shards of its rows, so the global batch does not depend on how many processes load it.
    Raises DataError (before anything compiles) for missing files or a tokenizer larger than the model vocab.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_shards = data_config.num_shards or process_count
    if num_shards % process_count:
        raise DataError(f"data.num_shards={num_shards} must be a multiple of the {process_count} processes")
    if global_batch_size % num_shards:
        raise DataError(f"train.batch_size={global_batch_size} is not divisible by the {num_shards} data shards "
                        f"(data.num_shards, default one per process)")
    rows = global_batch_size // num_shards
    tokenizer = make_tokenizer(data_config.tokenizer)
    check_tokenizer_fits(tokenizer, vocab_size, data_config.tokenizer)
    source = heldout.held_out_documents(data_config) if held_out else make_source(data_config)
    per_process = num_shards // process_count
    shards = [_shard_batches(data_config, source, tokenizer, seq_len, rows, index, num_shards, repeat=not held_out)
              for index in range(process_index * per_process, (process_index + 1) * per_process)]  # fmt: skip
    batches = shards[0] if len(shards) == 1 else grain.experimental.ZipIterDataset(shards).map(_ConcatRows())
    batches = batches.map(_CheckVocab(vocab_size, data_config.source))
    if data_config.worker_count > 0:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
    return batches


class _ConcatRows(grain.transforms.Map):
    def map(self, parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _shard_batches(data_config, source, tokenizer: Tokenizer, seq_len: int, rows: int, shard: int,
                   num_shards: int, repeat: bool = True) -> grain.IterDataset:  # fmt: skip
    """Batches [rows, seq_len] of the documents of one shard (documents shard, shard + num_shards, ...): shuffled
    and repeated forever, or (repeat=False) read once in order."""
    documents = grain.MapDataset.source(source)[shard::num_shards]
    if len(documents) == 0:
        raise DataError(f"data.source: data shard {shard} of {num_shards} gets no documents ({len(source)} in total)")
    if repeat:
        documents = documents.shuffle(seed=data_config.shuffle_seed).repeat()
    tokens = documents.map(_Tokenize(tokenizer))
    windows = grain.experimental.FlatMapIterDataset(tokens.to_iter_dataset(), _SplitIntoWindows(seq_len))
    if data_config.packing:
        rows_ds = grain.experimental.FirstFitPackIterDataset(
            windows, length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}, num_packing_bins=rows,
            seed=data_config.shuffle_seed, shuffle_bins=False,
        ).map(_FromPacked())
    else:
        rows_ds = windows.map(_PadOne(seq_len))
    return rows_ds.batch(rows, drop_remainder=True)
