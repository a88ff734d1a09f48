"""Load a transformers-format Phi-3 checkpoint into phi3fast's lean module, one tensor at a time.

- `model_dir` is a local directory or a Hugging Face Hub id (`microsoft/Phi-3-mini-4k-instruct`). A Hub id is
  taken from huggingface_hub's cache when a snapshot is there (no network); otherwise it is downloaded, unless
  HF_HUB_OFFLINE is set, in which case the error names the id.
- Weights: `model.safetensors`, or `model.safetensors.index.json` + its shards. Each tensor is read on its own
  (safetensors `safe_open`), moved to the device and, for a decoder linear with quantize='nf4', quantized at once,
  so peak host memory is about the largest tensor rather than the model.
- bitsandbytes-4bit checkpoints (transformers' `save_pretrained` of a `load_in_4bit` model) are loaded as their
  NF4 data, without re-quantizing (NF4Weight.from_bnb_state_dict).
- Every bad input (missing/garbled config.json, safetensors file, shard, tensor, wrong shape) is a Phi3FastError
  naming the file.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from phi3fast import quant
from phi3fast.errors import Phi3FastError
from phi3fast.lora.peft_io import load_adapter
from phi3fast.model.chat import load_tokenizer
from phi3fast.model.config import Phi3Config, load_config
from phi3fast.model.phi3 import Phi3ForCausalLM

# Files a Phi-3 checkpoint needs from the Hub (never *.bin / *.pt / *.gguf / onnx folders).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# bitsandbytes' per-weight quant-state keys, as transformers saves them next to `<module>.weight`.
BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def _offline() -> bool:
    from huggingface_hub import constants

    env = any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return env or bool(constants.HF_HUB_OFFLINE)


def resolve_model_dir(model: str | Path) -> Path:
    """A local checkpoint directory for `model` (a path or a Hub id), through huggingface_hub's cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists():
        raise Phi3FastError(f"{path}: not a directory (expected a Phi-3 checkpoint directory or a Hub id)")
    if not _HUB_ID.match(name):
        raise Phi3FastError(
            f"{name}: no such checkpoint directory (and not a Hub id like microsoft/Phi-3-mini-4k-instruct)"
        )
    from huggingface_hub import snapshot_download

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:  # a cached snapshot first: no network, the same files every time
        return Path(
            snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=True, cache_dir=cache_dir)
        )
    except Exception:
        pass
    if _offline():
        raise Phi3FastError(
            f"{name}: not a local directory and no cached copy in the Hugging Face cache while offline "
            f"(HF_HUB_OFFLINE); download it once with network access, or pass a local directory"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise Phi3FastError(
            f"{name}: not a local directory, no cached copy, and the Hugging Face Hub is unreachable "
            f"({type(e).__name__}: {first})"
        ) from None


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor key to its safetensors file (single file or sharded index); errors name the file."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
            raise Phi3FastError(
                f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}"
            ) from None
        files = {key: model_dir / shard for key, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise Phi3FastError(f"{shard}: missing (listed in {index.name})")
        return files
    if single.is_file():
        return {key: single for key in _keys(single)}
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise Phi3FastError(
            f"{model_dir}: only PyTorch .bin weights; phi3fast reads safetensors (model.safetensors)"
        )
    raise Phi3FastError(
        f"{single}: missing (no model.safetensors or model.safetensors.index.json in {model_dir})"
    )


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise Phi3FastError(f"{file}: not a valid safetensors file ({e})") from None


class _Reader:
    """Reads one tensor at a time from the right safetensors file, keeping files open (mmap) until closed."""

    def __init__(self, files: dict[str, Path], stack: ExitStack) -> None:
        self.files, self.stack, self.handles = files, stack, {}

    def get(self, key: str) -> Tensor:
        from safetensors import safe_open

        file = self.files[key]
        try:
            if file not in self.handles:
                self.handles[file] = self.stack.enter_context(safe_open(str(file), framework="pt"))
            return self.handles[file].get_tensor(key)
        except Exception as e:
            raise Phi3FastError(f"{file}: cannot read tensor '{key}' ({e})") from None


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on CUDA (Phi-3's training dtype); fp32 on CPU unless the caller asks (training picks bf16 itself).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _bnb_4bit(config: Phi3Config, where: Path) -> bool:
    q = config.quantization_config
    if not q:
        return False
    if q.get("quant_method") != "bitsandbytes" or not q.get("load_in_4bit"):
        raise Phi3FastError(
            f"{where}: quantization_config {q.get('quant_method')!r} is not bitsandbytes 4-bit"
        )
    if q.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise Phi3FastError(
            f"{where}: bitsandbytes quant type {q.get('bnb_4bit_quant_type')!r}; phi3fast reads nf4"
        )
    return True


def load(
    model_dir: str | Path,
    adapter: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = "nf4",
) -> Phi3ForCausalLM:
    """Load a transformers-format Phi-3 checkpoint (local dir or Hub id) into phi3fast's module, in eval mode.

    quantize: 'nf4' (QLoRA base: every decoder linear in NF4, quantized as it is read) or None (dense).
    dtype: the compute dtype of embeddings, norms, lm_head and activations; None = bf16 on CUDA, fp32 on CPU.
    device: None = CUDA if available, else CPU. adapter: a PEFT LoRA directory applied on top.
    The model carries `.config` (Phi3Config), `.tokenizer` (transformers, with Phi-3's chat template) and
    `.model_dir`. The file rules and errors: this module's docstring.
    """
    if quantize not in ("nf4", None):
        raise Phi3FastError(f"quantize must be 'nf4' or None, got {quantize!r}")
    root = resolve_model_dir(model_dir)
    config = load_config(root / "config.json")
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = dtype or default_dtype(dev)
    bnb = _bnb_4bit(config, root / "config.json")
    files = weight_files(root)

    with torch.device("meta"):  # no memory until each tensor is read
        model = Phi3ForCausalLM(config)
    linears = model.linears()
    if quantize == "nf4":
        # The NF4 kernels tile each row into whole 64-element blocks (all released Phi-3 sizes qualify).
        odd = sorted({s for lin in linears.values() for s in (lin.in_features, lin.out_features) if s % 64})
        if odd:
            raise Phi3FastError(
                f"{root / 'config.json'}: projection sizes {odd} are not multiples of 64, which NF4 needs; "
                f"load with quantize=None"
            )
    # Dense parameters (embeddings, norms, lm_head) by their shapes; Phi3Linear holds no parameter until loaded.
    expected: dict[str, tuple[int, ...]] = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, lin in linears.items():
        expected[f"{name}.weight"] = (lin.out_features, lin.in_features)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)

    def ckpt_key(name: str) -> str:
        return name if name.startswith("lm_head.") else f"model.{name}"

    missing = [ckpt_key(n) for n in expected if ckpt_key(n) not in files]
    if missing:
        where = sorted({str(p) for p in files.values()})
        raise Phi3FastError(
            f"{', '.join(where)}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    known = {ckpt_key(n) for n in expected}
    if config.tie_word_embeddings:
        known.add("lm_head.weight")  # some exports store the tied copy too; the embedding is the one read
    if bnb:
        known |= {f"{ckpt_key(n)}.weight.{s}" for n in linears for s in BNB_SUFFIXES}
    # Old exports carry RoPE caches (`rotary_emb.inv_freq`); RoPE is recomputed from the config, so they are dropped.
    unknown = [k for k in files if k not in known and not k.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise Phi3FastError(
            f"{files[unknown[0]]}: unexpected tensors {unknown[:5]} (not a Phi-3 checkpoint?)"
        )

    with ExitStack() as stack:
        reader = _Reader(files, stack)
        # Progress on a terminal only (disable=None): a real Phi-3 takes minutes to quantize on CPU.
        bar = tqdm(expected.items(), desc=f"loading {root.name}", unit="tensor", disable=None, leave=False)
        for name, shape in bar:
            key = ckpt_key(name)
            lin = linears.get(name.removesuffix(".weight"))
            if lin is not None and bnb:
                sd = {k: reader.get(k) for k in files if k == key or k.startswith(key + ".")}
                try:
                    w = quant.NF4Weight.from_bnb_state_dict(sd, key.removesuffix("weight"))
                except Exception as e:
                    raise Phi3FastError(
                        f"{files[key]}: bad bitsandbytes 4-bit tensor '{key}' ({e})"
                    ) from None
                if tuple(w.shape) != shape:
                    raise Phi3FastError(
                        f"{files[key]}: '{key}' has shape {tuple(w.shape)}, config needs {shape}"
                    )
                w = w.to(dev)
                lin.set_base(w if quantize == "nf4" else w.dequantize(dtype))
                continue
            t = reader.get(key)
            if tuple(t.shape) != shape:
                raise Phi3FastError(f"{files[key]}: '{key}' has shape {tuple(t.shape)}, config needs {shape}")
            if lin is not None:
                t = t.to(dev)
                lin.set_base(quant.quantize_nf4(t) if quantize == "nf4" else t.to(dtype))
            else:
                _set_param(model, name, t.to(device=dev, dtype=dtype))
            del t  # peak host memory: about one tensor
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.model_dir = root
    model.name_or_path = str(model_dir)
    model.tokenizer = load_tokenizer(root)
    model.eval()
    if adapter is not None:
        load_adapter(model, resolve_model_dir(adapter))
    return model


def _set_param(model: nn.Module, name: str, t: Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
