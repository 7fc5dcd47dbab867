"""Grouped matrix multiplication (the MoE expert GEMM)."""

from pallas_kernels.gmm.api import GROUPED_MATMUL, grouped_matmul
from pallas_kernels.gmm.reference import grouped_matmul_reference

__all__ = ["GROUPED_MATMUL", "grouped_matmul", "grouped_matmul_reference"]
