"""phi3fast.quant (NF4) against bitsandbytes itself: codes, statistics, dequantized values and state dicts.

Everything here is compared bit for bit (torch.equal): the format must be bitsandbytes' exactly, so the tolerance
is zero for every dtype. bitsandbytes 0.50's CPU quantize_4bit is its torch implementation and its nested 8-bit
quantizer is the C++ LUT one; both are the oracles. The Triton kernels run under TRITON_INTERPRET=1 (conftest).
"""

from __future__ import annotations

import json
import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from phi3fast import quant
from phi3fast.errors import Phi3FastError
from phi3fast.quant import NF4_BOUNDS, NF4FormatError, NF4Weight, quantize_nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 5), (17, 64), (130, 257), (64, 96)]
BLOCKSIZES = [32, 64, 128, 4096]
# bnb's torch dequantize (the C++ one is torch.compile'd; we want the plain reference function).
_bnb_dequant_reference = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: with several OpenMP threads on a loaded 2-core machine each torch op waits for
    its workers (~10 ms); one thread makes the module ~3x faster. Results do not depend on it (both sides run
    in this process with the same setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weight(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Rows with different scales (like real weights), an all-zero block when the shape has room for one."""
    w = torch.randn(shape) * 0.02 * (0.2 + torch.rand(shape[0], 1) * 3)
    if w.numel() >= 256:
        w.view(-1)[64:192] = 0.0
    return w.to(dtype)


def _bnb(w: torch.Tensor, blocksize: int, double_quant: bool) -> tuple[torch.Tensor, bnbf.QuantState]:
    return bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def _assert_same_as_bnb(ours: NF4Weight, packed: torch.Tensor, qs: bnbf.QuantState) -> None:
    assert ours.packed.dtype == torch.uint8 and ours.packed.shape == packed.shape
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, qs.absmax) and ours.absmax.dtype == qs.absmax.dtype
    assert torch.equal(ours.code, qs.code)
    assert ours.blocksize == qs.blocksize and ours.dtype == qs.dtype and ours.shape == tuple(qs.shape)
    assert ours.double_quant == qs.nested
    if qs.nested:
        assert torch.equal(ours.nested_absmax, qs.state2.absmax)
        assert torch.equal(ours.nested_code, qs.state2.code)
        assert torch.equal(ours.offset, qs.offset)


def _bnb_dequantize(packed: torch.Tensor, qs: bnbf.QuantState, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantized W in `dtype`.

    bnb 0.50's C++ CPU dequantize_4bit indexes the absmax per row (k * 2 / blocksize), which is wrong when a
    block crosses a row (K % blocksize != 0: it returns garbage for its own quantize_4bit output); there its torch
    reference (the same formula the CUDA kernel uses) is the oracle.
    """
    n, k = qs.shape
    if k % qs.blocksize == 0:
        state = bnbf.QuantState(
            qs.absmax, qs.shape, qs.code, qs.blocksize, "nf4", dtype, qs.offset, qs.state2
        )
        return bnbf.dequantize_4bit(packed, state, quant_type="nf4")
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    return _bnb_dequant_reference(packed.reshape(-1), absmax, qs.code, qs.blocksize, qs.shape, dtype)


# ---- codes and statistics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_equals_bitsandbytes(
    shape: tuple[int, int], dtype: torch.dtype, blocksize: int, double_quant: bool
) -> None:
    w = _weight(shape, dtype)
    packed, qs = _bnb(w, blocksize, double_quant)
    ours = quantize_nf4(w, blocksize, double_quant)
    _assert_same_as_bnb(ours, packed, qs)
    assert torch.equal(ours.dequantize(dtype), _bnb_dequantize(packed, qs, dtype))
    assert ours.dequantize(dtype).dtype == dtype


def test_two_threads_same_bits_and_setting_restored() -> None:
    """The CPU loops run on one thread internally; the mean (a reduction, whose rounding may depend on the
    thread count) runs under the caller's setting, as bitsandbytes' does. 35K blocks: the mean is parallel."""
    torch.set_num_threads(2)
    try:
        w = _weight((2048, 1100), torch.bfloat16)
        packed, qs = _bnb(w, 64, True)
        ours = quantize_nf4(w)
        assert torch.get_num_threads() == 2
        _assert_same_as_bnb(ours, packed, qs)
        assert torch.equal(ours.dequantize(torch.bfloat16), _bnb_dequantize(packed, qs, torch.bfloat16))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_non_contiguous_input() -> None:
    w = _weight((96, 17), torch.float16).t()
    packed, qs = _bnb(w, 64, True)
    _assert_same_as_bnb(quantize_nf4(w), packed, qs)


@pytest.mark.parametrize("blocksize", [256, 512, 1024, 2048])
def test_other_blocksizes(blocksize: int) -> None:
    w = _weight((33, 1000), torch.bfloat16)
    packed, qs = _bnb(w, blocksize, True)
    _assert_same_as_bnb(quantize_nf4(w, blocksize), packed, qs)


def test_many_nested_blocks_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """2300 blocks = 9 nested blocks (the last partial), quantized in 64-block chunks, plus a partial 4-bit block."""
    monkeypatch.setattr("phi3fast.kernels.nf4_quantize.CPU_CHUNK", 4096)  # the quantizer and dequantize chunk
    w = _weight((300, 491), torch.float16)
    packed, qs = _bnb(w, 64, True)
    ours = quantize_nf4(w)
    _assert_same_as_bnb(ours, packed, qs)
    assert ours.nested_absmax.numel() == 9
    assert torch.equal(ours.real_absmax(), bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset)
    assert torch.equal(ours.dequantize(torch.float16), _bnb_dequantize(packed, qs, torch.float16))


def test_all_zero_weight_and_equal_absmax() -> None:
    """All-zero blocks, and absmax residuals that are all 0 (a zero nested block: bnb writes code 0 there)."""
    for w in (torch.zeros(4, 128), torch.ones(8, 64).neg_(), torch.zeros(1, 1)):
        packed, qs = _bnb(w, 64, True)
        ours = quantize_nf4(w)
        _assert_same_as_bnb(ours, packed, qs)
        assert torch.equal(ours.dequantize(), w)


def _tie_weight() -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks whose absmax is 1.0 holding every codebook midpoint exactly (and its negation), so each scaled
    value sits on a tie; returns W and the codes ties must get (the lower neighbour)."""
    bounds = NF4_BOUNDS.tolist()
    values = [1.0, *bounds, *(-b for b in bounds)]  # 31 values
    values += [0.0] * (64 - len(values))
    w = torch.tensor(values * 2).view(2, 64)
    expected = torch.tensor(([15, *range(15), *(_lower_of(-b) for b in bounds)] + [7] * 33) * 2).view(2, 64)
    return w, expected


def _lower_of(x: float) -> int:
    return int(torch.searchsorted(NF4_BOUNDS, torch.tensor(x), right=False))


def _mul_div_sensitive(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax a, values x) where x * RN(1/a) and RN(x / a) fall on different sides of a codebook midpoint."""
    g = torch.Generator().manual_seed(7)
    a = torch.rand(4096, 1, generator=g) * 0.09 + 0.01
    x = (NF4_BOUNDS[None, :] * a).repeat(1, 9)
    for i in range(9):  # walk -4..+4 ulps around each midpoint * a
        step = i - 4
        for _ in range(abs(step)):
            part = x[:, i * 15 : (i + 1) * 15]
            x[:, i * 15 : (i + 1) * 15] = torch.nextafter(part, part + step)
    mul = torch.bucketize(x * (1.0 / a), NF4_BOUNDS)
    div = torch.bucketize(x / a, NF4_BOUNDS)
    rows, cols = torch.nonzero(mul != div, as_tuple=True)
    assert rows.numel() >= count, "no value separates multiply-by-reciprocal from divide"
    return a[rows[:count], 0], x[rows[:count], cols[:count]]


def test_ties_round_down_like_bitsandbytes() -> None:
    w, expected = _tie_weight()
    packed, qs = _bnb(w, 64, False)
    ours = quantize_nf4(w, 64, False)
    _assert_same_as_bnb(ours, packed, qs)
    assert torch.equal(ours.codes(), expected)


def test_reciprocal_then_multiply_and_divide_in_the_tail() -> None:
    """bnb multiplies by 1/absmax in full blocks and divides in the final partial block; values chosen so that
    doing it the other way changes codes (checked), so this fails for either mistake."""
    a, x = _mul_div_sensitive(20)
    full = torch.zeros(20, 32)
    full[:, 0], full[:, 1] = a, x  # 20 full blocks of 32, absmax a
    tail = torch.tensor([a[0].item(), *x[:1].tolist(), 0.0])  # a 3-element partial block
    w = torch.cat((full.reshape(-1), tail)).view(1, -1)
    packed, qs = _bnb(w, 32, False)
    ours = quantize_nf4(w, 32, False)
    _assert_same_as_bnb(ours, packed, qs)
    wrong_full = torch.bucketize(x / a, NF4_BOUNDS)
    assert not torch.equal(ours.codes()[0, 1 : 20 * 32 : 32].long(), wrong_full)


# ---- Triton kernel (interpreter on CPU) ------------------------------------------------------------------------

TRITON_CASES = [
    ((1, 1), 64),
    ((3, 5), 32),
    ((17, 64), 64),
    ((33, 130), 32),
    ((2, 4096), 4096),
    ((5, 300), 256),
]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
)
@pytest.mark.parametrize(("shape", "blocksize"), TRITON_CASES)
def test_triton_quantize_equals_bitsandbytes(
    shape: tuple[int, int], blocksize: int, dtype: torch.dtype
) -> None:
    """The kernels' output (codes, fp32 absmax) against bitsandbytes; then the double-quantized weight against
    the torch path on the same device (on a GPU, the offset is a CUDA mean, which may round differently from
    bitsandbytes' CPU mean)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = _weight(shape, dtype)
    packed, qs = _bnb(w, blocksize, False)
    _assert_same_as_bnb(quantize_nf4(w.to(device), blocksize, False, backend="triton").to("cpu"), packed, qs)
    ours = quantize_nf4(w.to(device), blocksize, backend="triton")
    ref = quantize_nf4(w.to(device), blocksize, backend="torch")
    for field in ("packed", "absmax", "nested_absmax", "offset"):
        assert torch.equal(getattr(ours, field), getattr(ref, field)), field
    if device == "cpu":
        packed, qs = _bnb(w, blocksize, True)
        _assert_same_as_bnb(ours, packed, qs)


def test_triton_ties_and_reciprocal() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w, expected = _tie_weight()
    a, x = _mul_div_sensitive(16)
    blocks = torch.zeros(16, 64)
    blocks[:, 0], blocks[:, 1] = a, x
    w = torch.cat((w.reshape(-1), blocks.reshape(-1))).view(-1, 64)
    packed, qs = _bnb(w, 64, False)
    ours = quantize_nf4(w.to(device), 64, False, backend="triton").to("cpu")
    _assert_same_as_bnb(ours, packed, qs)
    assert torch.equal(ours.codes()[:2], expected)


def test_aot_specs_cover_every_launch() -> None:
    from phi3fast.kernels import nf4_quantize

    specs = nf4_quantize.aot_specs()
    for bs in quant.SUPPORTED_BLOCKSIZES:
        bpp, warps = nf4_quantize.launch_config(bs)
        assert bpp * bs >= 1024 and warps * 32 * nf4_quantize.ELEMENTS_PER_THREAD == bpp * bs
        for name in ("nf4_block_absmax", "nf4_quantize"):
            got = [
                s
                for s in specs
                if s.name == name and s.constexprs == {"BLOCKSIZE": bs, "BLOCKS_PER_PROGRAM": bpp}
            ]
            assert len(got) == 3 and all(s.num_warps == warps for s in got)  # fp32, fp16, bf16


# ---- format properties ---------------------------------------------------------------------------------------------


def test_storage_at_most_4_13_bits_per_parameter() -> None:
    w = torch.randn(3072, 3072, dtype=torch.bfloat16)  # a Phi-3-mini o_proj
    bits = 8 * quantize_nf4(w).nbytes / w.numel()
    assert 4.12 < bits <= 4.13
    assert 8 * quantize_nf4(w[:64], double_quant=False).nbytes / (64 * 3072) > 4.5  # fp32 absmax: 4.5 bits


def test_to_device_moves_every_tensor() -> None:
    ours = quantize_nf4(_weight((17, 64), torch.float16)).to("meta")
    tensors = (ours.packed, ours.absmax, ours.code, ours.nested_absmax, ours.nested_code, ours.offset)
    assert all(t.device.type == "meta" for t in tensors) and ours.device.type == "meta"
    assert ours.shape == (17, 64) and ours.dtype == torch.float16 and ours.blocksize == 64


def test_dequantize_other_dtypes_round_once_from_fp32() -> None:
    w = _weight((9, 128), torch.bfloat16)
    ours = quantize_nf4(w)
    fp32 = ours.dequantize(torch.float32)
    packed, qs = _bnb(w, 64, True)
    assert torch.equal(fp32, _bnb_dequantize(packed, qs, torch.float32))
    assert torch.equal(ours.dequantize(torch.float16), fp32.half())


# ---- state dicts -------------------------------------------------------------------------------------------------


def _bnb_linear(w: torch.Tensor, double_quant: bool) -> bnb.nn.Linear4bit:
    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, compress_statistics=double_quant)
    lin.weight = bnb.nn.Params4bit(
        w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant
    )
    lin = lin.to("cpu")  # quantizes
    lin.support_avx512bf16_for_cpu = False  # else a bf16 kernel in eval mode (~5e-3 off); fp32 path is exact
    return lin


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_equals_bnb_linear4bit(double_quant: bool) -> None:
    w = _weight((17, 128), torch.bfloat16)
    prefix = "model.layers.0.mlp.down_proj."
    theirs = _bnb_linear(w, double_quant).state_dict(prefix=prefix)
    ours = quantize_nf4(w, double_quant=double_quant).to_bnb_state_dict(prefix)
    assert list(ours) == [k for k in theirs if k in ours] and set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    state = json.loads(bytes(ours[prefix + "weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert state["shape"] == [17, 128] and state["dtype"] == "bfloat16" and state["quant_type"] == "nf4"
    back = NF4Weight.from_bnb_state_dict(theirs, prefix)
    assert torch.equal(
        back.dequantize(torch.bfloat16), quantize_nf4(w, double_quant=double_quant).dequantize(torch.bfloat16)
    )


def test_our_state_dict_loads_into_bitsandbytes() -> None:
    w = _weight((33, 192), torch.float32)
    ours = quantize_nf4(w)
    sd = ours.to_bnb_state_dict("")
    qs = bnbf.QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"}, "cpu"
    )
    assert torch.equal(bnbf.dequantize_4bit(sd["weight"], qs, quant_type="nf4"), ours.dequantize())
    lin = bnb.nn.Linear4bit(192, 33, bias=False, compute_dtype=torch.float32)
    stats = {k: v for k, v in sd.items() if k != "weight"}
    lin.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=lin)
    lin.support_avx512bf16_for_cpu = False
    x = torch.randn(5, 192)
    with torch.no_grad():
        torch.testing.assert_close(
            lin.eval()(x), x @ ours.dequantize().T, rtol=1e-5, atol=1e-5
        )  # fp32 matmul order


def test_transformers_round_trip(tmp_path: os.PathLike) -> None:
    """Save a tiny Phi-3 quantized by transformers + bitsandbytes (CPU), read every 4-bit Linear with
    from_bnb_state_dict; then write a checkpoint whose 4-bit tensors come only from to_bnb_state_dict and load it
    back with transformers."""
    from safetensors.torch import load_file, save_file
    from transformers import BitsAndBytesConfig, Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    dense_dir, q_dir = tmp_path / "dense", tmp_path / "q"
    Phi3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(dense_dir)
    dense = load_file(dense_dir / "model.safetensors")
    bnb_cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    model = Phi3ForCausalLM.from_pretrained(
        dense_dir, quantization_config=bnb_cfg, device_map="cpu", dtype=torch.bfloat16
    )
    model.save_pretrained(q_dir)
    saved = load_file(q_dir / "model.safetensors")
    prefixes = [
        k.removesuffix("weight.quant_state.bitsandbytes__nf4")
        for k in saved
        if k.endswith("bitsandbytes__nf4")
    ]
    assert {p.split(".")[-2] for p in prefixes} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    for prefix in prefixes:
        ours = quantize_nf4(dense[prefix + "weight"])
        theirs = NF4Weight.from_bnb_state_dict(saved, prefix)
        for field in ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset"):
            assert torch.equal(getattr(theirs, field), getattr(ours, field)), (prefix, field)
        assert theirs.shape == ours.shape and theirs.dtype == torch.bfloat16
        for key, value in ours.to_bnb_state_dict(prefix).items():
            assert torch.equal(saved[key], value), key
            saved[key] = value.clone()  # the checkpoint below holds our tensors only
    save_file(saved, q_dir / "model.safetensors", metadata={"format": "pt"})
    reloaded = Phi3ForCausalLM.from_pretrained(q_dir, device_map="cpu", dtype=torch.bfloat16)
    layer = reloaded.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    prefix = "model.layers.0.mlp.down_proj."
    want = quantize_nf4(dense[prefix + "weight"]).dequantize(torch.bfloat16)
    assert torch.equal(
        bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state, quant_type="nf4"), want
    )


def test_quant_storage_bf16_reads_the_same_bytes() -> None:
    """transformers' bnb_4bit_quant_storage=bfloat16 stores the packed bytes as bf16 [n/4, 1]."""
    w = _weight((16, 64), torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(
        w, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16
    )
    sd = {"weight": packed, **{f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    assert torch.equal(NF4Weight.from_bnb_state_dict(sd).packed, quantize_nf4(w).packed)


# ---- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "kwargs", "match"),
    [
        (torch.randn(64), {}, "2-D"),
        (torch.randn(2, 3, 64), {}, "2-D"),
        (torch.randn(0, 64), {}, "empty"),
        (torch.randn(4, 64, dtype=torch.float64), {}, "float64"),
        (torch.ones(4, 64, dtype=torch.int32), {}, "int32"),
        (torch.randn(4, 64), {"blocksize": 48}, "blocksize"),
        (torch.randn(4, 64), {"backend": "cuda"}, "backend"),
        ([[1.0, 2.0]], {}, "torch.Tensor"),
        (torch.randn(4, 64).index_fill_(0, torch.tensor([2]), float("nan")), {}, r"w\[2, 0\] is nan"),
        (torch.randn(3, 50).index_fill_(0, torch.tensor([2]), float("inf")), {}, r"w\[2, 0\] is inf"),
    ],
)
def test_bad_inputs(w: object, kwargs: dict, match: str) -> None:
    with pytest.raises(NF4FormatError, match=match):
        quantize_nf4(w, **kwargs)  # type: ignore[arg-type]


def _good_sd(prefix: str = "p.") -> dict[str, torch.Tensor]:
    return quantize_nf4(torch.randn(4, 64)).to_bnb_state_dict(prefix)


def _with_state(sd: dict[str, torch.Tensor], **change: object) -> dict[str, torch.Tensor]:
    key = "p.weight.quant_state.bitsandbytes__nf4"
    state = {**json.loads(bytes(sd[key].tolist())), **change}
    return {**sd, key: torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda sd: {k: v for k, v in sd.items() if k != "p.weight.absmax"}, "'p.weight.absmax'"),
        (
            lambda sd: {k: v for k, v in sd.items() if k != "p.weight.nested_absmax"},
            "'p.weight.nested_absmax'",
        ),
        (lambda sd: {k: v for k, v in sd.items() if not k.endswith("nf4")}, "bitsandbytes__nf4"),
        (lambda sd: {**sd, "p.weight": sd["p.weight"][:-1]}, "packed bytes"),
        (lambda sd: {**sd, "p.weight.absmax": sd["p.weight.absmax"][:2]}, "absmax: shape"),
        (
            lambda sd: {
                **sd,
                "p.weight.quant_state.bitsandbytes__nf4": torch.tensor([255], dtype=torch.uint8),
            },
            "quant state",
        ),
        (lambda sd: _with_state(sd, quant_type="fp4"), "fp4"),
        (lambda sd: _with_state(sd, shape=[4, 64, 1]), "shape"),
        (lambda sd: _with_state(sd, blocksize=48), "blocksize"),
        (lambda sd: _with_state(sd, dtype="int8"), "dtype"),
        (lambda sd: _with_state(sd, nested_blocksize=128), "nested_blocksize"),
    ],
)
def test_bad_state_dicts(mutate, match: str) -> None:
    with pytest.raises(NF4FormatError, match=match):
        NF4Weight.from_bnb_state_dict(mutate(_good_sd()), "p.")


def test_errors_are_user_errors_and_prefix_must_end_with_a_dot() -> None:
    assert issubclass(NF4FormatError, Phi3FastError) and issubclass(NF4FormatError, ValueError)
    with pytest.raises(NF4FormatError, match="end with '.'"):
        quantize_nf4(torch.randn(4, 64)).to_bnb_state_dict("model.layers.0.mlp.down_proj")
    with pytest.raises(NF4FormatError, match="end with '.'"):
        NF4Weight.from_bnb_state_dict(_good_sd(), "p")
