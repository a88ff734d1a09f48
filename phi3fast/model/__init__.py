"""phi3fast.model: Phi-3 as lean PyTorch modules, and how a checkpoint becomes one.

config.py (Phi3Config, the variant registry) · phi3.py (the modules and KV cache; imports no loader) ·
loading.py (Hub, safetensors, NF4 as read: `load`) · chat.py (template, tokenizer, stop ids) · tiny.py (init-tiny).
"""

from phi3fast.model.config import REGISTRY, Phi3Config, load_config
from phi3fast.model.loading import load
from phi3fast.model.phi3 import KVCache, Phi3ForCausalLM, Phi3Linear, RotaryEmbedding

__all__ = ["REGISTRY", "KVCache", "Phi3Config", "Phi3ForCausalLM", "Phi3Linear", "RotaryEmbedding", "load"]
__all__ += ["load_config"]
