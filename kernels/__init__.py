"""phi3fast.kernels: hand-written Triton kernels (installed from the top-level kernels/ folder).

Every op takes backend='auto'|'triton'|'torch': 'auto' runs Triton on CUDA and the PyTorch reference on CPU.
To run the Triton kernels on CPU (tests), set TRITON_INTERPRET=1 before triton is imported and pass
backend='triton'. backend.py holds what the ops share; this package imports nothing from the rest of phi3fast.
"""

if __name__ == "kernels":  # imported as a top-level name from the repo root: see _toplevel.py
    import sys as _sys

    from ._toplevel import installed_kernels

    _sys.modules[__name__] = installed_kernels()
    _sys.modules.pop(__name__ + "._toplevel", None)
else:
    from .cross_entropy import fused_linear_cross_entropy
    from .lora import lora_linear, nf4_linear
    from .nf4 import nf4_dequantize, nf4_matmul
    from .rmsnorm import rms_norm
    from .rope import rope_qkv_
    from .swiglu import swiglu

    __all__ = ["fused_linear_cross_entropy", "lora_linear", "nf4_dequantize", "nf4_linear", "nf4_matmul"]
    __all__ += ["rms_norm", "rope_qkv_", "swiglu"]  # row-wise kernels
