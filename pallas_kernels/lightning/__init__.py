"""Lightning attention (Ring-linear linear-attention core): references, Pallas kernels, dispatching API."""

from pallas_kernels.lightning.api import lightning_attention, lightning_attention_decode
from pallas_kernels.lightning.reference import (
    lightning_attention_recurrent,
    lightning_attention_reference,
    lightning_decode_reference,
)

__all__ = [
    "lightning_attention",
    "lightning_attention_decode",
    "lightning_attention_recurrent",
    "lightning_attention_reference",
    "lightning_decode_reference",
]
