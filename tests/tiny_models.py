"""Tiny random-weight models of each supported architecture (plumbing tests only)."""
from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

COMMON = dict(vocab_size=97, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096)


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(1)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None))
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 3}, head_dim=32, sliding_window=40,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.config._attn_implementation = "sdpa"
    return model.eval()


ARCHS = ["llama", "qwen2", "mistral", "gemma3"]
