"""Grouped matrix multiplication (the MoE expert GEMM)."""

from pallas_kernels.gmm.api import IMPLEMENTATIONS, grouped_matmul
from pallas_kernels.gmm.reference import grouped_matmul_reference

__all__ = ["IMPLEMENTATIONS", "grouped_matmul", "grouped_matmul_reference"]
