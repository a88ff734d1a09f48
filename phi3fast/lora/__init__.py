"""phi3fast.lora: LoRA adapters on Phi-3 (adapter.py), in PEFT's format (peft_io.py), and merged into the base
(merge.py, imported on its own: it loads checkpoints)."""

from phi3fast.lora.adapter import TARGETS, LoraConfig, apply_lora, lora_parameters
from phi3fast.lora.peft_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    load_lora_state_dict,
    lora_state_dict,
    peft_config_dict,
    read_adapter_config,
    save_adapter,
)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "TARGETS", "LoraConfig", "apply_lora", "load_adapter"]
__all__ += ["load_lora_state_dict", "lora_parameters", "lora_state_dict", "peft_config_dict"]
__all__ += ["read_adapter_config", "save_adapter"]
