"""`phi3fast init-tiny`: a small random Phi-3 checkpoint in transformers' format, for tests, demos and benchmarks.

It takes the same loading path as a real Phi-3: config.json (model_type phi3, Phi3ForCausalLM), model.safetensors
with the fused `qkv_proj` / `gate_up_proj` keys, a tokenizer.json + tokenizer_config.json with Phi-3's chat
template, generation_config.json.

Tokenizer: a byte-level BPE trained with `tokenizers` on the bundled text (phi3fast/assets/tiny_corpus.txt).
Its layout copies Phi-3's: <unk> <s> </s> at 0, 1, 2, the learned tokens, then Phi-3's 11 added tokens in Phi-3's
order (<|endoftext|> <|assistant|> <|placeholder1-4|> <|system|> <|end|> <|placeholder5-6|> <|user|>).
eos == pad == <|endoftext|>; generation stops at <|endoftext|>, <|assistant|> or <|end|> (Phi-3's
generation_config). The embedding has `vocab` rows: rows past the tokenizer's size are padding, as Phi-3 pads its
32011 tokens to 32064.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from phi3fast._utils import atomic_dir
from phi3fast.errors import ArgumentError
from phi3fast.model.chat import PHI3_CHAT_TEMPLATE

CORPUS = Path(__file__).parents[1] / "assets" / "tiny_corpus.txt"
BASE_SPECIALS = ["<unk>", "<s>", "</s>"]
PHI3_ADDED = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
NF4_BLOCK = 64
# The smallest vocabulary: 256 byte symbols + <unk> <s> </s> + Phi-3's 11 added tokens (then no merges at all).
MIN_VOCAB = 256 + len(BASE_SPECIALS) + len(PHI3_ADDED)


def train_tokenizer(vocab: int):  # -> tokenizers.Tokenizer
    """Byte-level BPE on the bundled corpus with Phi-3's special tokens; at most `vocab` tokens in total."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - len(PHI3_ADDED),
        special_tokens=BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    # normalized=False: the chat markers are matched verbatim in the raw text, as in Phi-3's tokenizer.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in PHI3_ADDED])
    return tok


def _write_tokenizer(tok, out: Path, max_len: int) -> dict[str, int]:
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in BASE_SPECIALS + PHI3_ADDED}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "padding_side": "left",
        "chat_template": PHI3_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_map = {
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return ids


def init_tiny(
    out_dir: str | Path,
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 512,
    vocab: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random (seeded) tiny Phi-3 checkpoint to out_dir, atomically; returns the directory."""
    out = Path(out_dir)
    for name, value in (
        ("hidden", hidden),
        ("layers", layers),
        ("heads", heads),
        ("intermediate", intermediate),
    ):
        if value <= 0:
            raise ArgumentError(name, f"must be positive, got {value}")
    for name, value in (("hidden", hidden), ("intermediate", intermediate)):
        if value % NF4_BLOCK:  # every projection's sizes must tile into whole NF4 blocks
            raise ArgumentError(name, f"{value} must be a multiple of {NF4_BLOCK} (the NF4 block size)")
    if hidden % heads or (hidden // heads) % 2:
        raise ArgumentError("hidden", f"{hidden} must split into {heads} heads of even size (RoPE)")
    if vocab < MIN_VOCAB:
        raise ArgumentError(
            "vocab", f"{vocab} is too small: a byte-level BPE with Phi-3's tokens needs >= {MIN_VOCAB}"
        )
    with atomic_dir(out) as tmp:
        max_len = 4096
        ids = _write_tokenizer(train_tokenizer(vocab), tmp, max_len)
        eos, bos = ids["<|endoftext|>"], ids["<s>"]
        config = {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "hidden_act": "silu",
            "max_position_embeddings": max_len,
            "original_max_position_embeddings": max_len,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "rms_norm_eps": 1e-5,
            "sliding_window": None,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "tie_word_embeddings": False,
            "use_cache": True,
            "torch_dtype": "float32",
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {
            "bos_token_id": bos,
            "eos_token_id": [eos, ids["<|assistant|>"], ids["<|end|>"]],
            "pad_token_id": eos,
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(_random_weights(hidden, layers, heads, intermediate, vocab, seed), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
    return out


def _random_weights(
    hidden: int, layers: int, heads: int, intermediate: int, vocab: int, seed: int
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm_weight() -> torch.Tensor:
        # Not all ones: a loader that swapped or skipped a norm would still pass with ones.
        return 1.0 + normal(hidden, std=0.1)

    # std 1/sqrt(fan_in): attention scores and logits of order 1, so masks, RoPE and every weight visibly matter
    # (the 0.02 of Phi-3's initializer would leave attention almost uniform in a model this small).
    sd = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0)}
    for i in range(layers):
        p = f"model.layers.{i}"
        sd[f"{p}.self_attn.qkv_proj.weight"] = normal(3 * hidden, hidden, std=hidden**-0.5)
        sd[f"{p}.self_attn.o_proj.weight"] = normal(hidden, hidden, std=hidden**-0.5)
        sd[f"{p}.mlp.gate_up_proj.weight"] = normal(2 * intermediate, hidden, std=hidden**-0.5)
        sd[f"{p}.mlp.down_proj.weight"] = normal(hidden, intermediate, std=intermediate**-0.5)
        sd[f"{p}.input_layernorm.weight"] = norm_weight()
        sd[f"{p}.post_attention_layernorm.weight"] = norm_weight()
    sd["model.norm.weight"] = norm_weight()
    sd["lm_head.weight"] = normal(vocab, hidden, std=hidden**-0.5)
    return sd
