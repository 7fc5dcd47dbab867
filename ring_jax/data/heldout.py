"""Held-out documents: what training never reads and evaluation does.

The held-out set of a config is, in this order:
- `data.eval_source`: paths / globs like `data.source`, or 'default' for the synthetic tasks' held-out examples;
- for `data.source='default'`: the synthetic tasks' held-out examples (generated with the same seed at indices past
  `data.num_default_documents`, so never trained on);
- `data.eval_fraction` of `data.source`'s documents, a seeded choice (`data.shuffle_seed`) that training skips.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from ring_jax.data import sources, synthetic
from ring_jax.data.errors import DataError
from ring_jax.data.sources import Document

# The synthetic held-out set is generated on demand: its nominal size only bounds the indices.
SYNTHETIC_HELD_OUT = 10**6


class Subset:
    """The documents of `source` at `indices` (a random-access view)."""

    def __init__(self, source: Sequence[Document], indices: np.ndarray):
        self._source = source
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> Document:
        return self._source[int(self._indices[index])]


def split(source: Sequence[Document], fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(training, held-out) views of `source`: round(fraction * len) documents chosen by `seed` are held out."""
    order = np.random.default_rng([seed, len(source)]).permutation(len(source))
    held = int(round(fraction * len(source)))
    if fraction > 0 and not 0 < held < len(source):
        raise DataError(f"data.eval_fraction={fraction} of the {len(source)} documents of data.source leaves "
                        f"{held} held out and {len(source) - held} to train on; both need at least one")  # fmt: skip
    return Subset(source, np.sort(order[held:])), Subset(source, np.sort(order[:held]))


def uses_synthetic_tasks(data: ml_collections.ConfigDict) -> bool:
    """Whether the held-out set is the synthetic tasks' (whose answers `synthetic.verify` checks)."""
    return data.eval_source == "default" or (data.eval_source == "" and data.source == "default")


def has_held_out(data: ml_collections.ConfigDict) -> bool:
    return data.eval_source != "" or data.source == "default" or data.eval_fraction > 0


def training_documents(data: ml_collections.ConfigDict, documents: Sequence[Document]) -> Sequence[Document]:
    """`documents` (those of data.source) less the data.eval_fraction held out."""
    if data.eval_fraction == 0:
        return documents
    return split(documents, data.eval_fraction, data.shuffle_seed)[0]


def held_out_documents(data: ml_collections.ConfigDict) -> Sequence[Document]:
    """The held-out documents of a config (see the module docstring); DataError when it has none."""
    if uses_synthetic_tasks(data):
        return synthetic.SyntheticSource(SYNTHETIC_HELD_OUT, seed=data.shuffle_seed,
                                         first_index=data.num_default_documents)  # fmt: skip
    if data.eval_source:
        return sources.make_file_source(data.eval_source, data.format, data.text_field, field="data.eval_source")
    if data.eval_fraction > 0:
        documents = sources.make_file_source(data.source, data.format, data.text_field)
        return split(documents, data.eval_fraction, data.shuffle_seed)[1]
    raise DataError("data: no held-out documents (set data.eval_source or data.eval_fraction)")


def task_examples(data: ml_collections.ConfigDict, count: int) -> list[synthetic.Example]:
    """The first `count` synthetic held-out examples (prompt, answer, task)."""
    return [synthetic.example(data.shuffle_seed, data.num_default_documents + i) for i in range(count)]
