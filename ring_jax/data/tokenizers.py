"""Tokenizers: byte-level by default, any HF `tokenizer.json` through the `tokenizers` package."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from ring_jax.data.errors import DataError

# Special tokens recognised in HF vocabularies, most common spelling first.
_HF_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_HF_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS=256, EOS=257, PAD=258 (vocab 259)."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A HF `tokenizer.json` (fast tokenizers library); BOS/EOS found by their usual names, if present."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tokenizer

        if not os.path.isfile(path):
            raise DataError(f"data.tokenizer: no tokenizer.json at {path!r}")
        try:  # the parser is native code and reports bad files with bare Exceptions
            self._tokenizer = _Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"data.tokenizer: {path!r} is not a valid tokenizer.json "
                            f"({' '.join(str(e).split())[:200]})") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.bos_id = next((vocab[name] for name in _HF_BOS_NAMES if name in vocab), None)
        self.eos_id = next((vocab[name] for name in _HF_EOS_NAMES if name in vocab), None)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def make_tokenizer(spec: str) -> Tokenizer:
    """`spec` is 'bytes' or a path to a HF tokenizer.json."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)
