"""QLoRA's NF4 format, bit-compatible with bitsandbytes (quantize_4bit, quant_type='nf4'): the NF4Weight that
holds one quantized matrix, its bitsandbytes state-dict I/O, and the 8-bit quantizer of its absmax.

The layout, the exact rounding rules and the state-dict keys are specified in docs/nf4-format.md. The 4-bit
codebook and the block quantizer are pure tensor math shared with the Triton kernels, so they live in
phi3fast.kernels.nf4_quantize; phi3fast.quant.quantize_nf4 puts the two together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import torch

from phi3fast.errors import Phi3FastError
from phi3fast.kernels import nf4_quantize
from phi3fast.kernels.backend import one_cpu_thread
from phi3fast.kernels.nf4_quantize import NF4_BOUNDS, NF4_CODE, SUPPORTED_BLOCKSIZES

__all__ = [
    "NF4_BOUNDS",
    "NF4_CODE",
    "NESTED_BLOCKSIZE",
    "NF4FormatError",
    "NF4Weight",
    "SUPPORTED_BLOCKSIZES",
]
__all__ += ["SUPPORTED_DTYPES", "bits_per_parameter", "dynamic_map", "quantize_8bit"]

NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256, always
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QS_KEY = "quant_state.bitsandbytes__nf4"
_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer grid


class NF4FormatError(Phi3FastError, ValueError):
    """A tensor or state dict that is not a valid NF4 weight; the message says which argument or key."""


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, create_dynamic_map(signed=True): 256 sorted fp32 values in [-1, 1].

    Dynamic exponent (powers of ten 1e-6..1) times a linear fraction between 0.1 and 1, plus 0 and 1.0. Built
    from the same fp32 linspace and the same float arithmetic as bitsandbytes, so the values are bit-identical.
    """
    values: list[float] = []
    # 7 exponent bits, 8 total bits, signed: exponent e (0..6) has 2**e fraction intervals on each side.
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-6 + e)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry grid -> code table of bitsandbytes' CPU blockwise 8-bit quantizer."""
    mid = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.bucketize(grid, mid, right=False).to(torch.uint8)  # midpoints strictly below each grid point


_LUT_DYNAMIC = _lut_8bit(DYNAMIC_MAP)


@dataclass(frozen=True, eq=False)  # eq=False: identity hash/equality (tensors have no truth value)
class NF4Weight:
    """A frozen W[N, K] in NF4 (layout: docs/nf4-format.md). Holds tensors only; no grad."""

    packed: torch.Tensor  # uint8 [ceil(N*K/2), 1]
    absmax: torch.Tensor  # uint8 [nblocks] (double_quant) or float32 [nblocks]
    code: torch.Tensor  # float32 [16], the NF4 codebook
    nested_absmax: torch.Tensor | None  # float32 [ceil(nblocks/256)] (double_quant only)
    nested_code: torch.Tensor | None  # float32 [256], the 8-bit dynamic map (double_quant only)
    offset: torch.Tensor | None  # float32 scalar: the mean subtracted before quantizing absmax (double_quant)
    blocksize: int
    shape: tuple[int, int]  # (N, K)
    dtype: torch.dtype  # the dtype W had before quantization
    double_quant: bool

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this weight holds, the shared codebooks included."""
        tensors = (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: str | torch.device) -> NF4Weight:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            code=move(self.code),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=move(self.offset),
        )

    def real_absmax(self) -> torch.Tensor:
        """The decoded per-block scales, float32 [nblocks], computed as bitsandbytes does (multiply, then add)."""
        if not self.double_quant:
            return self.absmax.float()
        assert self.nested_code is not None and self.nested_absmax is not None and self.offset is not None
        scale = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: self.nblocks]
        return self.nested_code[self.absmax.long()] * scale + self.offset

    def codes(self) -> torch.Tensor:
        """The 4-bit indices as uint8 [N, K] (unpacked, high nibble first)."""
        flat = self.packed.reshape(-1)
        pairs = torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)
        return pairs[: self.numel].reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W as `dtype` [N, K]: code * absmax in fp32, then one rounding to dtype (bit-identical to bitsandbytes'
        dequantize_4bit when dtype is the original dtype)."""
        n, bs = self.numel, self.blocksize
        # byte -> (code[high nibble], code[low nibble]) as one 8-byte entry: a 1-D int64 gather decodes two
        # elements at once.
        pair_table = torch.stack((self.code.repeat_interleave(16), self.code.repeat(16)), dim=1)
        pair_table = pair_table.contiguous().view(torch.int64).view(-1)
        packed = self.packed.view(-1)
        out = torch.empty(n, dtype=dtype, device=self.device)
        full_n = n - n % bs
        chunk = (
            max(nf4_quantize.CPU_CHUNK // bs, 1) * bs
        )  # whole blocks, an even count: cache-sized temporaries
        with one_cpu_thread(self.device):
            scale = self.real_absmax()  # elementwise: the same bits with any thread count
            for start in range(0, full_n, chunk):
                stop = min(start + chunk, full_n)
                values = pair_table.index_select(0, packed[start // 2 : stop // 2].int()).view(torch.float32)
                # fp32 product, rounded once to dtype on the write (mul with a lower-precision out= does that).
                rows = out[start:stop].view(-1, bs)
                torch.mul(values.view(-1, bs), scale[start // bs : stop // bs, None], out=rows)
            if full_n < n:  # the final partial block: same product, one scale
                values = pair_table.index_select(0, packed[full_n // 2 :].int()).view(torch.float32)
                torch.mul(values[: n - full_n], scale[-1], out=out[full_n:])
        return out.view(self.shape)

    def quant_state_json(self) -> dict[str, Any]:
        """The non-tensor part of bitsandbytes' QuantState.as_dict(), in its key order."""
        state: dict[str, Any] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            assert self.offset is not None
            state.update(
                nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item()
            )
        return state

    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' Linear4bit saves for its weight, keys `{prefix}weight[.…]` (docs/nf4-format.md)."""
        _check_prefix(prefix)
        key = f"{prefix}weight"
        sd = {key: self.packed, f"{key}.absmax": self.absmax, f"{key}.quant_map": self.code}
        if self.double_quant:
            assert self.nested_absmax is not None and self.nested_code is not None
            sd[f"{key}.nested_absmax"] = self.nested_absmax
            # A copy, not a shared tensor, as bitsandbytes saves it (safetensors refuses shared storage).
            sd[f"{key}.nested_quant_map"] = self.nested_code.clone()
        # json.dumps with default separators, exactly as bitsandbytes.utils.pack_dict_to_tensor writes it.
        raw = json.dumps(self.quant_state_json()).encode("utf-8")
        sd[f"{key}.{_QS_KEY}"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "") -> NF4Weight:
        """Read a bitsandbytes/transformers 4-bit NF4 weight from a state dict (other keys are ignored)."""
        _check_prefix(prefix)
        key = f"{prefix}weight"

        def get(name: str) -> torch.Tensor:
            if name not in sd:
                raise NF4FormatError(f"state dict has no key {name!r} (an NF4 weight needs it)")
            value = sd[name]
            if not isinstance(value, torch.Tensor):
                raise NF4FormatError(f"state dict key {name!r} must be a tensor, got {type(value).__name__}")
            return value

        qs_tensor = get(f"{key}.{_QS_KEY}")
        if f"{key}.quant_state.bitsandbytes__fp4" in sd:
            raise NF4FormatError(f"{key}: quant_type 'fp4' is not supported, only 'nf4'")
        try:
            state = json.loads(bytes(qs_tensor.detach().cpu().to(torch.uint8).numpy()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NF4FormatError(f"{key}.{_QS_KEY}: not a bitsandbytes quant state ({exc})") from None
        if not isinstance(state, dict):
            raise NF4FormatError(f"{key}.{_QS_KEY}: expected a JSON object, got {type(state).__name__}")
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in state:
                raise NF4FormatError(f"{key}.{_QS_KEY}: missing {field!r}")
        if state["quant_type"] != "nf4":
            raise NF4FormatError(f"{key}: quant_type {state['quant_type']!r} is not supported, only 'nf4'")
        blocksize = state["blocksize"]
        if blocksize not in SUPPORTED_BLOCKSIZES:
            raise NF4FormatError(f"{key}: blocksize {blocksize!r} is not one of {SUPPORTED_BLOCKSIZES}")
        shape = state["shape"]
        if not (
            isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)
        ):
            raise NF4FormatError(f"{key}: shape {shape!r} is not a 2-D weight shape [N, K]")
        dtype = getattr(torch, str(state["dtype"]), None)
        if dtype not in SUPPORTED_DTYPES:
            raise NF4FormatError(f"{key}: dtype {state['dtype']!r} is not float32, float16 or bfloat16")

        n, k = shape
        nblocks = -(-(n * k) // blocksize)
        # transformers may store the packed bytes in a wider dtype (bnb_4bit_quant_storage); the bytes are the same.
        packed = get(key).detach().contiguous().view(torch.uint8).reshape(-1, 1)
        if packed.shape[0] != (n * k + 1) // 2:
            raise NF4FormatError(
                f"{key}: {packed.shape[0]} packed bytes, expected {(n * k + 1) // 2} for {shape}"
            )
        code = get(f"{key}.quant_map").detach().float()
        if code.shape != (16,):
            raise NF4FormatError(f"{key}.quant_map: shape {tuple(code.shape)}, expected (16,)")
        absmax = get(f"{key}.absmax").detach()
        if absmax.shape != (nblocks,):
            raise NF4FormatError(f"{key}.absmax: shape {tuple(absmax.shape)}, expected ({nblocks},)")

        double_quant = f"{key}.nested_absmax" in sd or "nested_offset" in state
        if not double_quant:
            return cls(packed, absmax.float(), code, None, None, None, blocksize, (n, k), dtype, False)
        for field in ("nested_blocksize", "nested_offset"):
            if field not in state:
                raise NF4FormatError(f"{key}.{_QS_KEY}: missing {field!r} (the weight is double-quantized)")
        if state["nested_blocksize"] != NESTED_BLOCKSIZE:
            raise NF4FormatError(
                f"{key}: nested_blocksize {state['nested_blocksize']!r} is not supported, only {NESTED_BLOCKSIZE}"
            )
        if absmax.dtype != torch.uint8:
            raise NF4FormatError(f"{key}.absmax: dtype {absmax.dtype}, expected uint8 (double-quantized)")
        nested_absmax = get(f"{key}.nested_absmax").detach().float()
        if nested_absmax.shape != (-(-nblocks // NESTED_BLOCKSIZE),):
            raise NF4FormatError(
                f"{key}.nested_absmax: shape {tuple(nested_absmax.shape)} does not fit {shape}"
            )
        nested_code = get(f"{key}.nested_quant_map").detach().float()
        if nested_code.shape != (256,):
            raise NF4FormatError(f"{key}.nested_quant_map: shape {tuple(nested_code.shape)}, expected (256,)")
        # float(json) -> fp32 is exact: the JSON holds the repr of an fp32 value.
        offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32, device=absmax.device)
        return cls(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, (n, k), dtype, True)


def quantize_8bit(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU blockwise 8-bit quantizer (dynamic map, 65536-point grid): codes uint8, absmax fp32."""
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    am = padded.abs().amax(dim=1)  # zero padding cannot raise an absmax
    v = (padded * (1.0 / am)[:, None]).clamp_(-1, 1)
    v = torch.where(
        (am == 0)[:, None], torch.zeros_like(v), v
    )  # 0 * inf; bnb skips these blocks (code 0 below)
    # Each step rounds to fp32 separately, as bnb's AVX2 intrinsics do; trunc == floor since the value is >= 0.5.
    idx = ((((v + 1.0) * 0.5) * (_LUT_SIZE - 1)) + 0.5).to(torch.int64)
    q = _LUT_DYNAMIC.to(x.device)[idx]
    q = torch.where((am == 0)[:, None], torch.zeros_like(q), q)  # bnb writes code 0 for an all-zero block
    return q.reshape(-1)[:n], am


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or (prefix and not prefix.endswith(".")):
        raise NF4FormatError(
            f"prefix must be '' or end with '.', like 'model.layers.0.mlp.down_proj.', got {prefix!r}"
        )


def bits_per_parameter(w: NF4Weight) -> float:
    """Storage per weight element, everything included."""
    return 8 * w.nbytes / w.numel
