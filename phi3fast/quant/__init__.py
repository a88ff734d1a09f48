"""phi3fast.quant: QLoRA's NF4 format (bit-compatible with bitsandbytes) and the quantizer.

format.py holds NF4Weight (one quantized matrix, its bitsandbytes state-dict I/O); quantize.py turns a dense weight
into one, through the kernels of phi3fast.kernels.nf4_quantize. The layout is specified in docs/nf4-format.md.
"""

from phi3fast.quant.format import (
    NESTED_BLOCKSIZE,
    NF4_BOUNDS,
    NF4_CODE,
    SUPPORTED_BLOCKSIZES,
    NF4FormatError,
    NF4Weight,
    bits_per_parameter,
    dynamic_map,
)
from phi3fast.quant.quantize import quantize_nf4

__all__ = [
    "NESTED_BLOCKSIZE",
    "NF4_BOUNDS",
    "NF4_CODE",
    "SUPPORTED_BLOCKSIZES",
    "NF4FormatError",
    "NF4Weight",
]
__all__ += ["bits_per_parameter", "dynamic_map", "quantize_nf4"]
