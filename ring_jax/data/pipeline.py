"""grain input pipeline: source -> process shard -> shuffle -> tokenize into windows -> pack -> batch.

Each batch is a dict of numpy arrays, all [rows, seq_len]:
  inputs      int32  token ids fed to the model
  targets     int32  next-token ids
  segment_ids int32  1, 2, ... per packed document; 0 = padding (attention and lightning state never cross)
  positions   int32  position within its document (restarts at 0 in each segment)
  loss_mask   float32 1 where the target is a real token the loss learns (fine-tuning records: only the completion,
              `ring_jax.data.sft`)
Documents are tokenized as [BOS] + ids + [EOS] (when the tokenizer has them); documents longer than
seq_len + 1 tokens are cut into windows that become separate segments. Memory does not grow with the document:
a document is read, tokenized and cut into windows a piece at a time (`_DocumentWindows`). Documents without text
are skipped (a source where every document is empty is an error), and every token id is checked against the model
vocabulary on the host, naming the document.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from ring_jax.data import heldout, sft, sources, synthetic
from ring_jax.data.errors import DataError
from ring_jax.data.sources import Document
from ring_jax.data.tokenizers import Tokenizer, make_tokenizer


def _whitespace_cut_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """Re-cuts text pieces just before their last space or newline, so no word is split between two tokenizer
    calls (exact for the byte tokenizer, and the same tokens as the whole text for whitespace-split vocabularies);
    a document that arrives as one piece is passed whole. A piece without whitespace is carried until it reaches
    2 * PIECE_CHARS, then cut anyway (bounded memory)."""
    carry = ""
    remaining = iter(pieces)
    current = next(remaining, None)
    while current is not None:
        following = next(remaining, None)
        text = carry + current
        current = following
        if following is None:
            if text:
                yield text
            return
        cut = max(text.rfind(" "), text.rfind("\n"))
        if cut <= 0:
            if len(text) < 2 * sources.PIECE_CHARS:
                carry = text
                continue
            cut = len(text)
        yield text[:cut]
        carry = text[cut:]


_NO_DOCUMENT: Iterator[dict[str, np.ndarray]] = iter(())  # exhausted: the iterator has not started a document


class _DocumentWindows(grain.IterDataset):
    """Documents (str or `sources.Document`) -> windows {'inputs', 'targets', 'loss_mask'} of at most seq_len
    next-token pairs.

    Tokens are produced lazily, a text piece at a time, so a window is emitted as soon as seq_len + 1 tokens are
    there; the iterator state is (parent state before the current document, windows emitted from it).
    """

    def __init__(self, parent: grain.IterDataset, *, tokenizer: Tokenizer, seq_len: int, vocab_size: int,
                 num_documents: int, source_name: str):
        super().__init__(parent)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.num_documents = num_documents
        self.source_name = source_name

    def __iter__(self) -> _DocumentWindowsIterator:
        return _DocumentWindowsIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"_DocumentWindows(seq_len={self.seq_len})"


class _DocumentWindowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: _DocumentWindows):
        super().__init__(parent)
        self._spec = spec
        self._windows = _NO_DOCUMENT
        self._document_start_state = self._parent.get_state()
        self._windows_done = 0
        self._empty_in_a_row = 0  # documents without a window since the last one that had some

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            window = next(self._windows, None)
            if window is not None:
                self._windows_done += 1
                self._empty_in_a_row = 0
                return window
            if self._windows is not _NO_DOCUMENT and self._windows_done == 0:
                self._count_empty_document()
            self._document_start_state = self._parent.get_state()
            self._windows = self._document_windows(next(self._parent))
            self._windows_done = 0

    def _count_empty_document(self) -> None:
        # Each epoch is shuffled anew, so a source with some text can still show up to 2 * (n - 1) empty documents
        # in a row across an epoch boundary; 2 * n in a row means none has any.
        self._empty_in_a_row += 1
        if self._empty_in_a_row >= 2 * self._spec.num_documents:
            raise DataError(f"data.source: none of the {self._spec.num_documents} documents of "
                            f"{self._spec.source_name!r} has any text")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._document_start_state, "windows_done": self._windows_done,
                "empty_in_a_row": self._empty_in_a_row}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._document_start_state = state["parent"]
        self._empty_in_a_row = state["empty_in_a_row"]
        self._windows, self._windows_done = _NO_DOCUMENT, 0
        if state["windows_done"]:
            self._windows = self._document_windows(next(self._parent))
            for _ in range(state["windows_done"]):  # re-tokenizes the document up to there, a piece at a time
                next(self._windows)
            self._windows_done = state["windows_done"]

    def _document_windows(self, document: str | Document) -> Iterator[dict[str, np.ndarray]]:
        n = self._spec.seq_len
        tokens, learned = np.zeros(0, np.int32), np.zeros(0, np.float32)
        for ids, ids_learned in self._document_ids(document):
            tokens, learned = np.concatenate([tokens, ids]), np.concatenate([learned, ids_learned])
            while len(tokens) > n:
                yield {"inputs": tokens[:n].copy(), "targets": tokens[1:n + 1].copy(),
                       "loss_mask": learned[1:n + 1].copy()}  # fmt: skip
                tokens, learned = tokens[n:], learned[n:]
        if len(tokens) >= 2:
            yield {"inputs": tokens[:-1].copy(), "targets": tokens[1:].copy(), "loss_mask": learned[1:].copy()}

    def _document_ids(self, document: str | Document) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(token ids int32, learned float32) in pieces, the ids checked against the vocabulary: a fine-tuning
        record whole (`sft.encode`), text as [BOS] + ids + [EOS], every token learned; nothing for an empty text."""
        if isinstance(document, str):
            where, content = f"a document of data.source={self._spec.source_name!r}", iter([document])
        else:
            where, content = document.where, document.read()
        if isinstance(content, dict):
            tokens, learned = sft.encode(content, self._spec.tokenizer)
            self._check_ids(tokens, where)
            yield tokens, learned
            return
        for ids in self._text_ids(content, where):
            yield ids, np.ones(len(ids), np.float32)

    def _text_ids(self, pieces: Iterator[str], where: str) -> Iterator[np.ndarray]:
        tokenizer = self._spec.tokenizer
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        started = False
        for text in _whitespace_cut_pieces(pieces):
            try:
                ids = tokenizer.encode(text)
            except UnicodeError as e:
                raise DataError(f"data.source: {where}: text the tokenizer cannot encode ({e.reason})") from None
            if not ids.size:
                continue
            self._check_ids(ids, where)
            if not started:
                ids, started = np.concatenate([np.asarray(bos, np.int32), ids]), True
            yield ids.astype(np.int32)
        if started and tokenizer.eos_id is not None:
            yield np.asarray([tokenizer.eos_id], np.int32)

    def _check_ids(self, ids: np.ndarray, where: str) -> None:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self._spec.vocab_size:
            bad = low if low < 0 else high
            raise DataError(f"data: token id {bad} of {where} is outside [0, model.vocab_size="
                            f"{self._spec.vocab_size}) (data.tokenizer gives ids the model does not have)")


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
    for name, token_id in (("BOS", tokenizer.bos_id), ("EOS", tokenizer.eos_id)):
        if token_id is not None and not 0 <= token_id < vocab_size:
            raise DataError(f"data.tokenizer: {tokenizer_spec!r} has {name} id {token_id}, outside "
                            f"[0, model.vocab_size={vocab_size})")


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
    shards = [_shard_batches(data_config, source, tokenizer, seq_len, rows, vocab_size, index, num_shards,
                             repeat=not held_out)
              for index in range(process_index * per_process, (process_index + 1) * per_process)]  # fmt: skip
    batches = shards[0] if len(shards) == 1 else grain.experimental.ZipIterDataset(shards).map(_ConcatRows())
    if data_config.worker_count > 0:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
    return batches


class _ConcatRows(grain.transforms.Map):
    def map(self, parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _shard_batches(data_config, source, tokenizer: Tokenizer, seq_len: int, rows: int, vocab_size: int, shard: int,
                   num_shards: int, repeat: bool = True) -> grain.IterDataset:  # fmt: skip
    """Batches [rows, seq_len] of the documents of one shard (documents shard, shard + num_shards, ...): shuffled
    and repeated forever, or (repeat=False) read once in order."""
    documents = grain.MapDataset.source(source)[shard::num_shards]
    if len(documents) == 0:
        raise DataError(f"data.source: data shard {shard} of {num_shards} gets no documents ({len(source)} in total)")
    num_documents = len(documents)
    if repeat:
        documents = documents.shuffle(seed=data_config.shuffle_seed).repeat()
    windows = _DocumentWindows(documents.to_iter_dataset(), tokenizer=tokenizer, seq_len=seq_len,
                               vocab_size=vocab_size, num_documents=num_documents, source_name=data_config.source)
    if data_config.packing:
        rows_ds = grain.experimental.FirstFitPackIterDataset(
            windows, length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}, num_packing_bins=rows,
            seed=data_config.shuffle_seed, shuffle_bins=False,
        ).map(_FromPacked())
    else:
        rows_ds = windows.map(_PadOne(seq_len))
    return rows_ds.batch(rows, drop_remainder=True)
