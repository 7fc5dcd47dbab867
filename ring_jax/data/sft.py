"""Supervised fine-tuning documents: which tokens the loss learns.

A document is plain text (every token is learned) or a record of a `.jsonl` / ArrayRecord source:
  {"prompt": str, "completion": str}   learns the completion and the EOS after it, not the BOS and prompt;
  {"messages": [{"role", "content"}]}  rendered with the tokenizer's chat template (tokenizer_config.json's
                                       `chat_template`, or chat_template.jinja beside tokenizer.json); learns the
                                       text each assistant turn adds (its content and end-of-turn markup).
`encode` returns the tokens and a per-token mask (1: the token is a training target); the pipeline carries the mask
through windowing and packing into the batch's `loss_mask`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ring_jax.data.errors import DataError
from ring_jax.data.sources import FineTuningRecord
from ring_jax.data.tokenizers import Tokenizer


def encode(document: str | FineTuningRecord, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n] int32, learned [n] float32): learned[i] = 1 where tokens[i] is a training target.

    Plain text and prompt/completion records get the tokenizer's BOS / EOS (when it has them); a chat template
    writes its own special tokens."""
    if isinstance(document, str):
        pieces = [(document, True)]
    elif "messages" in document:
        return _encode_pieces(chat_pieces(document["messages"], tokenizer), tokenizer, specials=False)
    else:
        pieces = [(document["prompt"], False), (document["completion"], True)]
    return _encode_pieces(pieces, tokenizer, specials=True)


def _encode_pieces(pieces: Sequence[tuple[str, bool]], tokenizer: Tokenizer, *,
                   specials: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    tokens: list[np.ndarray] = []
    learned: list[np.ndarray] = []

    def add(ids: Sequence[int] | np.ndarray, learn: bool) -> None:
        ids = np.asarray(ids, np.int32)
        tokens.append(ids)
        learned.append(np.full(len(ids), float(learn), np.float32))

    if specials and tokenizer.bos_id is not None:
        add([tokenizer.bos_id], False)
    for text, learn in pieces:
        add(tokenizer.encode(text), learn)
    if specials and tokenizer.eos_id is not None:
        add([tokenizer.eos_id], pieces[-1][1])  # learning to stop belongs to the learned completion
    return np.concatenate(tokens), np.concatenate(learned)


def chat_pieces(messages: list[dict[str, str]], tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, learned) pieces: each assistant turn's added text is learned.

    An assistant turn's text is what rendering the conversation up to it adds to the rendering up to the turn before
    with the generation prompt; the template must render conversations incrementally (each shorter conversation a
    prefix of the longer one), else DataError."""
    template = tokenizer.chat_template
    if template is None:
        raise DataError(f"data.tokenizer: {tokenizer.name!r} has no chat template (tokenizer_config.json "
                        f"'chat_template'), which 'messages' records need")  # fmt: skip
    specials = tokenizer.special_tokens
    full = render_chat(template, messages, specials, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(template, messages[:index], specials, add_generation_prompt=True)
        upto = render_chat(template, messages[: index + 1], specials, add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= done):
            raise DataError(f"data.tokenizer: the chat template of {tokenizer.name!r} does not render conversations "
                            f"incrementally, so assistant turns cannot be told apart from the prompt")  # fmt: skip
        pieces += [(full[done : len(prompt)], False), (full[len(prompt) : len(upto)], True)]
        done = len(upto)
    pieces.append((full[done:], False))
    return [(text, learn) for text, learn in pieces if text]


def render_chat(template: str, messages: list[dict[str, str]], special_tokens: Mapping[str, str], *,
                add_generation_prompt: bool) -> str:  # fmt: skip
    """A chat template rendered as HF tokenizers render it (sandboxed jinja2, trimmed blocks)."""
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      **special_tokens)  # fmt: skip


@functools.cache
def _compiled(template: str) -> Any:
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise DataError(f"data.tokenizer: the chat template refused a conversation: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])  # fmt: skip
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template)
