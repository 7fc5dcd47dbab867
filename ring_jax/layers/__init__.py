"""Flax NNX building blocks of the Ring-linear hybrid stack."""
