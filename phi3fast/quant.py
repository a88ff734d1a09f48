"""QLoRA's NF4 format, bit-compatible with bitsandbytes (quantize_4bit, quant_type='nf4').

Layout (what bitsandbytes stores, and what phi3fast.kernels reads)
-----------------------------------------------------------------
W[N, K] is flattened row-major and cut into blocks of `blocksize` consecutive elements (the last block may be
partial). Each block is scaled by its absmax into [-1, 1] and every element becomes the index of the nearest NF4
codebook value. Two 4-bit indices share a byte: element 2i in the HIGH nibble, 2i+1 in the low nibble; `packed`
is uint8 [ceil(N*K/2), 1] (an odd element count pads the last low nibble with the code of 0.0, i.e. 7).

With double quantization the per-block absmax (fp32) is itself quantized: its mean (`offset`) is subtracted and
the residuals are quantized blockwise (blocks of 256) to uint8 codes into bitsandbytes' signed 8-bit dynamic map
(`nested_code`, 256 entries), with one fp32 scale per 256 blocks (`nested_absmax`). So
    real_absmax[b] = nested_code[absmax[b]] * nested_absmax[b // 256] + offset
and storage is 4 + 8/blocksize + 32/(256*blocksize) = 4.127 bits per parameter at blocksize 64.

Rounding, exactly as bitsandbytes does it (so our codes equal its codes on the same input)
------------------------------------------------------------------------------------------
- 4-bit: scaled = clamp(x * (1/max(absmax, 1e-38)), -1, 1) in fp32 (the reciprocal is rounded once, then
  multiplied); the final partial block divides instead (x / max(absmax, 1e-38)), as bitsandbytes' torch path
  does. The code is the number of codebook midpoints strictly below `scaled`: a value exactly on a midpoint
  rounds DOWN (bitsandbytes' torch.bucketize(right=False); its CUDA decision tree uses the same fp32 pivots with
  `>`). We count them exactly with a table on the top 16 bits of `scaled` (CPU) or 15 compares (Triton).
- 8-bit (nested absmax): bitsandbytes' CPU library maps v = clamp(x * (1/absmax), -1, 1) onto a 65536-entry grid,
  idx = trunc(((v + 1) * 0.5) * 65535 + 0.5), and looks the code up in a table built from the grid points
  -1 + 2i/65535 (code = midpoints strictly below the grid point). A block whose absmax is 0 gets code 0.
  We reproduce that table, so nested codes match bitsandbytes' CPU output bit for bit.
- The offset is `absmax.mean()` in fp32 on the weight's device, the torch reduction bitsandbytes calls (so a CPU
  and a CUDA quantization of one weight may differ in the offset's last bit, as bitsandbytes' do).
The oracle of the tests is bitsandbytes on CPU. On CUDA, bitsandbytes' own 8-bit kernel searches the 256-entry map
directly instead of the 65536-point grid, so a checkpoint it quantized on a GPU can hold nested codes one step
away from ours in rare cases; reading such a checkpoint is unaffected (the stored codes are used as they are).
NaN/inf weights are refused (bitsandbytes quantizes them silently into NaN blocks).

State dict
----------
`to_bnb_state_dict(prefix)` writes exactly the tensors bitsandbytes' Linear4bit (and so transformers'
save_pretrained) writes for a 4-bit weight, with `prefix` joined as torch does: prefix="model.layers.0.mlp.down_proj."
gives "model.layers.0.mlp.down_proj.weight", "...weight.absmax", "...weight.quant_map", "...weight.nested_absmax",
"...weight.nested_quant_map" and "...weight.quant_state.bitsandbytes__nf4" (uint8 bytes of a JSON object with
quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset, in bitsandbytes' key order).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from phi3fast.errors import Phi3FastError

__all__ = [
    "NF4_BOUNDS",
    "NF4_CODE",
    "NF4FormatError",
    "NF4Weight",
    "SUPPORTED_BLOCKSIZES",
    "dynamic_map",
    "quantize_nf4",
]

# bitsandbytes' NF4 codebook (QLoRA, Dettmers et al. 2023): the 16 quantiles of N(0, 1), normalized to [-1, 1].
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# fp32 midpoints between neighbouring codes; equal to the pivots of bitsandbytes' CUDA decision tree.
NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256, always
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QS_KEY = "quant_state.bitsandbytes__nf4"
# Elements per CPU chunk: a multiple of every blocksize; ~14 bytes of temporaries per element -> ~3.5 MB.
_CPU_CHUNK = 1 << 18
_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer grid


@contextmanager
def one_cpu_thread(device: torch.device, on: bool = True) -> Iterator[None]:
    """Run the chunked CPU loops below with one intra-op thread (a no-op off CPU or when `on` is False).

    Design note: each 256K-element chunk is ~10 small torch ops. With several intra-op threads each op is an
    OpenMP parallel region, and on a busy machine every region waits for descheduled workers. Measured on the
    2-core box at load ~13 (3072x8192 bf16): quantize 4.0 s with 2 threads vs 0.48 s with 1, dequantize 1.47 s
    vs 0.16 s. The price on an idle machine is at most the parallel speed-up of these memory-bound loops.
    """
    threads = torch.get_num_threads()
    if not on or device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


_DYNAMIC_MAP = dynamic_map()


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry grid -> code table of bitsandbytes' CPU blockwise 8-bit quantizer."""
    mid = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.bucketize(grid, mid, right=False).to(torch.uint8)  # midpoints strictly below each grid point


_LUT_DYNAMIC = _lut_8bit(_DYNAMIC_MAP)


@dataclass(frozen=True, eq=False)  # eq=False: identity hash/equality (tensors have no truth value)
class NF4Weight:
    """A frozen W[N, K] in NF4 (see the module docstring for the layout). Holds tensors only; no grad."""

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
        # elements at once (3x faster than gathering [256, 2] rows).
        pair_table = torch.stack((self.code.repeat_interleave(16), self.code.repeat(16)), dim=1)
        pair_table = pair_table.contiguous().view(torch.int64).view(-1)
        packed = self.packed.view(-1)
        out = torch.empty(n, dtype=dtype, device=self.device)
        full_n = n - n % bs
        chunk = max(_CPU_CHUNK // bs, 1) * bs  # whole blocks, an even count: cache-sized temporaries
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
        """The tensors bitsandbytes' Linear4bit saves for its weight, keys `{prefix}weight[.…]` (see module doc)."""
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
        if dtype not in _SUPPORTED_DTYPES:
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


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *, backend: str = "auto"
) -> NF4Weight:
    """Quantize W[N, K] (fp32/fp16/bf16) to NF4 exactly as bitsandbytes.functional.quantize_4bit(quant_type='nf4',
    compress_statistics=double_quant) does. backend: 'auto' = Triton on CUDA, torch on CPU; 'torch'; 'triton'
    (on CPU only under TRITON_INTERPRET=1)."""
    if not isinstance(w, torch.Tensor):
        raise NF4FormatError(f"quantize_nf4: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise NF4FormatError(f"quantize_nf4: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise NF4FormatError(f"quantize_nf4: w is empty, shape {tuple(w.shape)}")
    if w.dtype not in _SUPPORTED_DTYPES:
        raise NF4FormatError(f"quantize_nf4: w must be float32, float16 or bfloat16, got {w.dtype}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise NF4FormatError(
            f"quantize_nf4: blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}"
        )
    if backend not in ("auto", "torch", "triton"):
        raise NF4FormatError(f"quantize_nf4: backend must be 'auto', 'torch' or 'triton', got {backend!r}")

    if backend == "triton" and not w.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise NF4FormatError(
            "quantize_nf4: backend='triton' on CPU needs TRITON_INTERPRET=1 before triton loads"
        )
    w = w.detach()
    if backend == "triton" or (backend == "auto" and w.is_cuda):
        from phi3fast.kernels.nf4_quantize import nf4_quantize_blocks

        packed, absmax = nf4_quantize_blocks(w, blocksize)
    else:
        with one_cpu_thread(w.device):
            packed, absmax = quantize_blocks_torch(w, blocksize)
    # A NaN or inf makes its whole block NaN (bitsandbytes quantizes it silently); say where instead.
    bad = torch.nonzero(~torch.isfinite(absmax)) if not bool(torch.isfinite(absmax.sum())) else absmax[:0]
    if bad.numel():
        block = w.reshape(-1)[int(bad[0, 0]) * blocksize :][:blocksize]
        first = int(bad[0, 0]) * blocksize + int(torch.nonzero(~torch.isfinite(block))[0, 0])
        row, col = divmod(first, w.shape[1])
        value = w.reshape(-1)[first].item()
        raise NF4FormatError(f"quantize_nf4: w[{row}, {col}] is {value}; NaN and inf cannot be quantized")

    code = NF4_CODE.to(w.device)
    shape = (w.shape[0], w.shape[1])
    if not double_quant:
        return NF4Weight(packed, absmax, code, None, None, None, blocksize, shape, w.dtype, False)
    # The same fp32 torch reduction bitsandbytes uses, under the caller's thread setting (a parallel reduction
    # may round differently with another thread count), so the same bits as bitsandbytes in this process.
    offset = absmax.mean()
    with one_cpu_thread(w.device):  # elementwise ops and per-block maxima: the same bits on any thread count
        qabsmax, nested_absmax = _quantize_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Weight(
        packed,
        qabsmax,
        code,
        nested_absmax,
        _DYNAMIC_MAP.to(w.device),
        offset,
        blocksize,
        shape,
        w.dtype,
        True,
    )


def quantize_blocks_torch(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes uint8 [ceil(n/2), 1] and fp32 absmax [nblocks] of W (any shape), bitsandbytes' rounding.

    Works through W in chunks of whole blocks (_CPU_CHUNK elements: the temporaries stay in L2, and peak memory
    stays a few MB above the output whatever the size of W).
    """
    flat = w.reshape(-1)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    out = packed.view(-1)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=w.device)
    full_n = n - n % blocksize
    chunk = max(_CPU_CHUNK // blocksize, 1) * blocksize  # whole blocks, an even count
    for start in range(0, full_n, chunk):
        blocks = flat[start : min(start + chunk, full_n)].float().view(-1, blocksize)
        am = blocks.abs().amax(dim=1)  # (torch.aminmax over dim=1 is ~9x slower on CPU)
        absmax[start // blocksize : start // blocksize + am.numel()] = am
        # Multiply by the rounded reciprocal, as bitsandbytes does; clamp(min=1e-38) keeps all-zero blocks at 0.
        scaled = torch.mul(blocks, (1.0 / am.clamp_(min=1e-38))[:, None]).clamp_(-1, 1)
        out[start // 2 : start // 2 + scaled.numel() // 2] = _pack_pairs(_nf4_codes(scaled.view(-1)))
    if full_n < n:  # the final partial block: bitsandbytes divides here instead, and keeps the clamped absmax
        tail = flat[full_n:].float()
        am_tail = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am_tail
        scaled = (tail / am_tail).clamp_(-1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(
                scaled, (0, 1)
            )  # the pad nibble is the code of 0.0 (7), as in bnb
        out[full_n // 2 :] = _pack_pairs(_nf4_codes(scaled.view(-1)))
    return packed, absmax


def _nf4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """uint8 codes of values in [-1, 1]: how many codebook midpoints lie strictly below each (ties round down).

    Exact table lookup on the top 16 bits of the fp32 pattern (sign, exponent, 7 mantissa bits): all floats with
    the same top bits form one interval, which holds at most one midpoint, so code = base[key] + (x > mid[key]).
    Two gathers and a compare cost ~4x less than 15 compare-and-add passes and ~15x less than torch.bucketize.
    """
    base, mid = _code_tables(scaled.device)
    key = scaled.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF)
    codes = base.index_select(0, key.view(-1)).view(scaled.shape)
    codes += scaled > mid.index_select(0, key.view(-1)).view(scaled.shape)
    return codes


_CODE_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _code_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _CODE_TABLES:
        top = (
            torch.arange(65536, dtype=torch.int32) << 16
        )  # wraps to the sign bit for keys >= 2**15, as wanted
        ends = torch.stack((top.view(torch.float32), (top | 0xFFFF).view(torch.float32)))
        ends = ends.nan_to_num(0.0, 0.0, 0.0).clamp(-1, 1)  # inf/NaN patterns never occur in clamped values
        lo, hi = torch.bucketize(ends.amin(0), NF4_BOUNDS), torch.bucketize(ends.amax(0), NF4_BOUNDS)
        assert int((hi - lo).max()) <= 1, "a 16-bit bucket straddles two NF4 midpoints"
        mid = torch.where(hi > lo, NF4_BOUNDS[lo.clamp(max=14)], torch.tensor(2.0))  # 2.0: never exceeded
        _CODE_TABLES[device] = (lo.to(torch.uint8).to(device), mid.to(device))
    return _CODE_TABLES[device]


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[2n] uint8 codes -> [n] bytes, code 2i in the high nibble and 2i + 1 in the low one."""
    if (
        sys.byteorder == "little"
    ):  # one int16 lane holds the pair (2i in its low byte): 4x faster than strided
        pairs = codes.view(torch.int16)
        return ((pairs << 4) | (pairs >> 8)).to(torch.uint8)
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def _quantize_8bit(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
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
