"""python -m ring_jax.generate (--workdir DIR | --hf HF_DIR) --prompt TEXT [--prompt TEXT ...] [--prompts-file F]
[--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop TEXT ...]

One prompt streams its completion as it is decoded; several prompts run as one batch and each completion is printed
when its row finishes. Rows stop at the tokenizer's EOS (unless --ignore-eos), at any --stop text, or after
--max-new-tokens. A summary (tokens, finish reason, time) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

import numpy as np

from ring_jax.config import SUPPORTED_DTYPES
from ring_jax.data.tokenizers import Tokenizer
from ring_jax.generate.engine import FINISHED, Completion, GenerationConfig, generate
from ring_jax.generate.loading import load_model_and_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ring_jax.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a train.py workdir (its latest complete checkpoint)")
    source.add_argument("--hf", help="an HF Ring-linear checkpoint directory (config.json + safetensors)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line (empty lines skipped)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop", action="append", default=[], help="text that ends a row (repeatable; \\n and \\t are escapes)"
    )
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    parser.add_argument("--no-bos", action="store_true", help="do not start prompts with the tokenizer's BOS")
    parser.add_argument("--step", type=int, default=None, help="--workdir: the checkpoint step (default: latest)")
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None, help="compute dtype")
    parser.add_argument("--tokenizer", default=None, help="'bytes' or a tokenizer.json path (overrides the default)")
    parser.add_argument("--max-length", type=int, default=None, help="prompt + new tokens limit per row")
    parser.add_argument("--prefill-chunk", type=int, default=GenerationConfig.prefill_chunk)
    parser.add_argument("--decode-block", type=int, default=GenerationConfig.decode_block)
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT or --prompts-file FILE")
    return prompts


def unescape(text: str) -> str:
    """'\\n' and '\\t' typed on a command line -> newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def stop_sequences(tokenizer: Tokenizer, stops: list[str], ignore_eos: bool) -> tuple[tuple[int, ...], ...]:
    stops = [unescape(text) for text in stops]
    sequences = [tuple(int(t) for t in tokenizer.encode(text)) for text in stops]
    for text, sequence in zip(stops, sequences, strict=True):
        if not sequence:
            raise ValueError(f"--stop {text!r}: encodes to no tokens")
    if tokenizer.eos_id is not None and not ignore_eos:
        sequences.append((tokenizer.eos_id,))
    return tuple(sequences)


class StreamPrinter:
    """Prints completions as they grow: a single row streams text (holding back the tokens a stop sequence may still
    claim, and half-decoded characters); with several rows each is printed whole when it finishes."""

    def __init__(self, tokenizer: Tokenizer, prompts: list[str], holdback: int, out: TextIO):
        self._tokenizer, self._prompts, self._holdback, self._out = tokenizer, prompts, holdback, out
        self._printed = ""
        self._finished: set[int] = set()

    def update(self, tokens: np.ndarray, done: np.ndarray) -> None:
        if len(self._prompts) == 1 and not done[0]:
            row = tokens[0][tokens[0] != FINISHED]
            text = self._tokenizer.decode(row[: max(len(row) - self._holdback, 0)]).rstrip("\ufffd")
            self._write_suffix(text)

    def finish(self, completions: list[Completion]) -> None:
        for row, completion in enumerate(completions):
            text = self._tokenizer.decode(completion.content)
            if len(self._prompts) == 1:
                self._write_suffix(text)
                self._out.write("\n")
            else:
                self._out.write(f"--- [{row}] {self._prompts[row]}\n{text}\n")
        self._out.flush()

    def _write_suffix(self, text: str) -> None:
        if text.startswith(self._printed) and len(text) > len(self._printed):
            self._out.write(text[len(self._printed) :])
            self._out.flush()
            self._printed = text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prompts = read_prompts(args)
        model, tokenizer = load_model_and_tokenizer(
            workdir=args.workdir, hf=args.hf, step=args.step, dtype=args.dtype, tokenizer=args.tokenizer
        )
        bos = [] if args.no_bos or tokenizer.bos_id is None else [tokenizer.bos_id]
        token_prompts = [bos + [int(t) for t in tokenizer.encode(text)] for text in prompts]
        stops = stop_sequences(tokenizer, args.stop, args.ignore_eos)
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_sequences=stops,
            max_length=args.max_length,
            prefill_chunk=args.prefill_chunk,
            decode_block=args.decode_block,
        )
        printer = StreamPrinter(tokenizer, prompts, max((len(s) for s in stops), default=0), sys.stdout)
        start = time.perf_counter()
        completions = generate(model, token_prompts, config, on_update=printer.update)
        elapsed = time.perf_counter() - start
    except (ValueError, FileNotFoundError) as e:  # config, checkpoint and tokenizer errors are among these
        print(f"error: {e}", file=sys.stderr)
        return 2
    printer.finish(completions)
    total = sum(len(c.tokens) for c in completions)
    reasons = ", ".join(sorted({c.finish_reason for c in completions}))
    summary = f"[{len(completions)} rows, {total} tokens ({reasons}) in {elapsed:.1f} s incl. compilation]"
    print(summary, file=sys.stderr)
    return 0
