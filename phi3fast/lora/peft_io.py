"""LoRA adapters in PEFT's format: state dicts, adapter_config.json and adapter_model.safetensors.

On disk: `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, ...) and `adapter_model.safetensors` with keys
`base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_{A|B}.weight`, so `peft.PeftModel.from_pretrained`
loads them over transformers' Phi-3, and adapters trained by PEFT load here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from phi3fast._utils import atomic_write
from phi3fast.errors import Phi3FastError
from phi3fast.lora.adapter import TARGETS, LoraConfig, apply_lora

if TYPE_CHECKING:
    from phi3fast.model.phi3 import Phi3ForCausalLM

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model.model."


def lora_state_dict(model: Phi3ForCausalLM) -> dict[str, Tensor]:
    """LoRA weights under PEFT's key names (fp32, detached, on CPU)."""
    sd = {}
    for name, lin in model.linears().items():
        if lin.lora_A is not None:
            sd[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = lin.lora_A.detach().float().cpu().contiguous()
            sd[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = lin.lora_B.detach().float().cpu().contiguous()
    return sd


def load_lora_state_dict(model: Phi3ForCausalLM, sd: dict[str, Tensor], where: str = "state dict") -> None:
    """Copy LoRA weights (PEFT key names) into a model that has LoRA applied; keys and shapes must match exactly."""
    own = {}
    for name, lin in model.linears().items():
        if lin.lora_A is not None:
            own[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = lin.lora_A
            own[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = lin.lora_B
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise Phi3FastError(
            f"{where}: LoRA tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for key, p in own.items():
            t = sd[key]
            if t.shape != p.shape:
                raise Phi3FastError(
                    f"{where}: '{key}' has shape {tuple(t.shape)}, the model needs {tuple(p.shape)}"
                )
            p.copy_(t.to(p.dtype))


def peft_config_dict(cfg: LoraConfig, base_model: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: Phi3ForCausalLM, out_dir: str | Path) -> Path:
    """Write adapter_model.safetensors then adapter_config.json (each atomically) in PEFT's format."""
    from safetensors.torch import save_file

    if model.lora_config is None:
        raise Phi3FastError("the model has no LoRA adapters to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = lora_state_dict(model)
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    base = getattr(model, "name_or_path", None) or str(model.model_dir or "")
    text = json.dumps(peft_config_dict(model.lora_config, base), indent=2) + "\n"
    atomic_write(out / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text))
    return out


def read_adapter_config(adapter_dir: Path) -> LoraConfig:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise Phi3FastError(f"{path}: missing (a PEFT LoRA adapter needs adapter_config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(raw, dict)
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError) as e:
        raise Phi3FastError(f"{path}: not a valid JSON object ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise Phi3FastError(f"{path}: peft_type {raw.get('peft_type')!r}; phi3fast loads LORA adapters")
    unsupported = {
        "use_dora": raw.get("use_dora"),
        "fan_in_fan_out": raw.get("fan_in_fan_out"),
        "rank_pattern": raw.get("rank_pattern"),
        "alpha_pattern": raw.get("alpha_pattern"),
        "layers_to_transform": raw.get("layers_to_transform"),
        "modules_to_save": raw.get("modules_to_save"),
    }
    used = [k for k, v in unsupported.items() if v]
    if used or raw.get("bias", "none") != "none":
        raise Phi3FastError(
            f"{path}: unsupported LoRA options {used or ['bias']} (phi3fast: plain LoRA, bias none)"
        )
    targets = raw.get("target_modules")
    if targets == "all-linear":
        targets = list(TARGETS)
    if not isinstance(targets, list):
        raise Phi3FastError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    try:
        return LoraConfig(
            r=int(raw["r"]),
            alpha=float(raw["lora_alpha"]),
            dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=tuple(targets),
            use_rslora=bool(raw.get("use_rslora", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise Phi3FastError(f"{path}: bad LoRA config ({type(e).__name__}: {e})") from None


def read_adapter_weights(adapter_dir: str | Path) -> tuple[Path, dict[str, Tensor]]:
    """The adapter's weights file and its tensors, keys without PEFT's adapter name (PEFT may keep it in keys
    saved by hand: "...lora_A.default.weight")."""
    from safetensors.torch import load_file

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise Phi3FastError(f"{weights}: missing (the adapter's weights)")
    try:
        sd = load_file(str(weights))
    except Exception as e:
        raise Phi3FastError(f"{weights}: not a valid safetensors file ({e})") from None
    return weights, {
        k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
        for k, v in sd.items()
    }


def load_adapter(model: Phi3ForCausalLM, adapter_dir: str | Path) -> None:
    """Apply the adapter's LoRA config to `model` and load its weights (PEFT format)."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights, sd = read_adapter_weights(adapter_dir)
    apply_lora(model, cfg)
    load_lora_state_dict(model, sd, str(weights))
