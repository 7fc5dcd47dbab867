"""Tokenizers: byte-level by default, any HF `tokenizer.json` through the `tokenizers` package (with the special
tokens and chat template of the `tokenizer_config.json` beside it, when there is one)."""

from __future__ import annotations

import json
import os
from typing import Protocol

import numpy as np

from ring_jax.data.errors import DataError

# Special tokens recognised in HF vocabularies, most common spelling first.
_HF_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_HF_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str  # what data.tokenizer said: 'bytes' or the tokenizer.json path
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None  # jinja2 source, for 'messages' records
    special_tokens: dict[str, str]  # e.g. {'bos_token': '<s>'}: variables of the chat template

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS=256, EOS=257, PAD=258 (vocab 259)."""

    name = "bytes"
    chat_template = None
    special_tokens: dict[str, str] = {}
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
    """A HF `tokenizer.json` (fast tokenizers library). BOS / EOS are the `bos_token` / `eos_token` of the
    tokenizer_config.json beside it when it names them (null: none), else found by their usual names."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tokenizer

        if not os.path.isfile(path):
            raise DataError(f"data.tokenizer: no tokenizer.json at {path!r}")
        self.name = path
        try:  # the parser is native code and reports bad files with bare Exceptions
            self._tokenizer = _Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"data.tokenizer: {path!r} is not a valid tokenizer.json "
                            f"({' '.join(str(e).split())[:200]})") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        config = _tokenizer_config(path)
        self.special_tokens = {key: _token_text(value) for key, value in config.items()
                               if key.endswith("_token") and _token_text(value) is not None}  # fmt: skip
        self.bos_id = self._special_id(config, "bos_token", _HF_BOS_NAMES, vocab)
        self.eos_id = self._special_id(config, "eos_token", _HF_EOS_NAMES, vocab)
        self.chat_template = _chat_template(path, config)

    def _special_id(self, config: dict, key: str, usual_names: tuple[str, ...], vocab: dict[str, int]) -> int | None:
        if key in config:
            text = _token_text(config[key])
            if text is not None and text not in vocab:
                raise DataError(f"data.tokenizer: tokenizer_config.json beside {self.name!r} names {key} {text!r}, "
                                 "which is not in the vocabulary")  # fmt: skip
            return None if text is None else vocab[text]
        return next((vocab[name] for name in usual_names if name in vocab), None)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_config(tokenizer_json: str) -> dict:
    path = os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return config if isinstance(config, dict) else {}


def _chat_template(tokenizer_json: str, config: dict) -> str | None:
    """tokenizer_config.json's `chat_template` (a string, or a list of named templates: 'default'), else the
    chat_template.jinja file beside tokenizer.json."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)  # fmt: skip
    if isinstance(template, str):
        return template
    path = os.path.join(os.path.dirname(tokenizer_json), "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return None


def make_tokenizer(spec: str) -> Tokenizer:
    """`spec` is 'bytes' or a path to a HF tokenizer.json."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)
