"""Tiny random Llama checkpoints for the interop tests, as transformers writes them and as llama.cpp's GGUF.

The GGUF writer here is the test's own, independent of phi3fast.interop: it follows llama.cpp's conventions
(ggml dims innermost first, attn_q/attn_k rows permuted to interleaved-RoPE order, gpt2 BPE tokenizer keys) so
transformers' own GGUF loader is the oracle for what the file means.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from phi3fast.model.tiny import _write_tokenizer, train_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB = 512


def make_llama(
    out: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tie: bool = False,
    seed: int = 0,
    **extra: object,
) -> Path:
    """A random LlamaForCausalLM saved by transformers (safetensors), with a BPE tokenizer and a ChatML template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True)
    tok = train_tokenizer(VOCAB)
    ids = _write_tokenizer(tok, out, 2048)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["chat_template"] = CHATML
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    eos = ids["<|endoftext|>"]
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=ids["<s>"],
        eos_token_id=[eos, ids["<|end|>"]],
        pad_token_id=eos,
        **extra,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # of order-1 activations so that every weight visibly matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 if "embed" in name else p.shape[1] ** -0.5))
    model.save_pretrained(str(out))
    return out


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter: rows (head, half, i) -> (head, i, half).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(ckpt: Path, out: Path, q8_names: tuple[str, ...] = ()) -> Path:
    """The Llama checkpoint at `ckpt` as a llama-architecture GGUF file (F32; the named tensors Q8_0)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((ckpt / "config.json").read_text())
    sd = {k: v.float().numpy() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    tc = json.loads((ckpt / "tokenizer_config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base((cfg.get("rope_parameters") or cfg)["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_vocab_size(cfg["vocab_size"])
    vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv_: kv_[1])]
    special = {t["content"] for t in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"][0])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_chat_template(tc["chat_template"])

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if "lm_head.weight" in sd:
        names["lm_head.weight"] = "output.weight"
    part = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in part.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = _llamacpp_permute(t, heads)
        elif gg.endswith("attn_k.weight"):
            t = _llamacpp_permute(t, kv)
        if gg in q8_names:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gg, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gg, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
