"""Blockwise FP8 matmuls (dense and grouped) for FP8 training: the recipe, its reference, Pallas kernels, API."""

from pallas_kernels.fp8.api import BLOCKWISE_FP8, blockwise_grouped_matmul, blockwise_matmul
from pallas_kernels.fp8.recipe import Fp8Recipe

__all__ = [
    "BLOCKWISE_FP8",
    "Fp8Recipe",
    "blockwise_grouped_matmul",
    "blockwise_matmul",
]
