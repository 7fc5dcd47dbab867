"""Embedded default corpus: generated tasks with verifiable answers (no downloads).

Every document is `prompt + answer + "\n"` from one of three tasks, a pure function of (seed, index):
- arithmetic: multi-digit addition / subtraction, e.g. "add 123+4567=4690";
- retrieval: key-value lookup over a context of pairs, e.g. "kv ab=31 cd=07 ef=93 ?cd=07";
- reverse: string reversal, e.g. "rev hello>olleh".
The answers are checkable (`verify`), so the same generator later serves as an RL reward.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

TASKS = ("arithmetic", "retrieval", "reverse")


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt}{self.answer}\n"


def _number(rng: np.random.Generator) -> int:
    digits = int(rng.integers(1, 5))
    return int(rng.integers(10 ** (digits - 1) if digits > 1 else 0, 10**digits))


def _arithmetic(rng: np.random.Generator) -> Example:
    a, b = _number(rng), _number(rng)
    if rng.random() < 0.5:
        return Example("arithmetic", f"add {a}+{b}=", str(a + b))
    return Example("arithmetic", f"sub {a}-{b}=", str(a - b))


def _retrieval(rng: np.random.Generator) -> Example:
    letters = np.array(list(string.ascii_lowercase))
    num_pairs = int(rng.integers(4, 13))
    keys: list[str] = []
    while len(keys) < num_pairs:  # distinct two-letter keys
        key = "".join(rng.choice(letters, 2))
        if key not in keys:
            keys.append(key)
    values = [f"{int(v):02d}" for v in rng.integers(0, 100, num_pairs)]
    query = int(rng.integers(num_pairs))
    context = " ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    return Example("retrieval", f"kv {context} ?{keys[query]}=", values[query])


def _reverse(rng: np.random.Generator) -> Example:
    word = "".join(rng.choice(np.array(list(string.ascii_lowercase)), int(rng.integers(3, 11))))
    return Example("reverse", f"rev {word}>", word[::-1])


_GENERATORS = {"arithmetic": _arithmetic, "retrieval": _retrieval, "reverse": _reverse}


def example(seed: int, index: int) -> Example:
    """Document `index` of the corpus with `seed`; task cycles deterministically with the index."""
    rng = np.random.default_rng([seed, index])
    return _GENERATORS[TASKS[index % len(TASKS)]](rng)


def verify(prompt: str, completion: str) -> bool:
    """True iff `completion` (up to the first newline) is the correct answer to a task `prompt`."""
    answer = completion.split("\n", 1)[0].strip()
    if prompt.startswith(("add ", "sub ")) and prompt.endswith("="):
        a, op, b = prompt[4:-1].partition("+") if prompt.startswith("add") else prompt[4:-1].partition("-")
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        return answer == str(expected)
    if prompt.startswith("kv ") and prompt.endswith("="):
        context, _, query = prompt[3:-1].rpartition(" ?")
        pairs = dict(pair.split("=") for pair in context.split())
        return pairs.get(query) == answer
    if prompt.startswith("rev ") and prompt.endswith(">"):
        return answer == prompt[4:-1][::-1]
    raise ValueError(f"not a synthetic task prompt: {prompt!r}")


class SyntheticSource:
    """grain random-access source of `num_documents` generated documents (strings): indices first_index, ...;
    training reads those from 0, the held-out set (`ring_jax.data.heldout`) those past the training ones."""

    def __init__(self, num_documents: int, seed: int = 0, first_index: int = 0):
        self._num_documents = num_documents
        self._seed = seed
        self._first_index = first_index

    def __len__(self) -> int:
        return self._num_documents

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < self._num_documents:
            raise IndexError(index)
        return example(self._seed, self._first_index + int(index)).text

    def __repr__(self) -> str:
        return f"SyntheticSource({self._num_documents} documents from index {self._first_index}, seed={self._seed})"
