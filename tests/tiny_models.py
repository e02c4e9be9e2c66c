"""Tiny random-weight models of each tested architecture (plumbing tests only)."""
from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=97, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096)
# (model class, config class, overrides of COMMON)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": None}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               {"num_hidden_layers": 3, "head_dim": 32, "sliding_window": 40, "attn_logit_softcapping": None,
                "final_logit_softcapping": None, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               {"num_hidden_layers": 3, "head_dim": 32, "sliding_window": 40,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"sliding_window": None, "pad_token_id": 0}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
}
ARCHS = list(FAMILIES)


def tiny(arch: str, **overrides) -> torch.nn.Module:
    model_cls, config_cls, extra = FAMILIES[arch]
    torch.manual_seed(1)
    cfg = getattr(tf, config_cls)(**{**COMMON, **extra, **overrides})
    model = getattr(tf, model_cls)(cfg)
    # set directly: Gemma2's class refuses SDPA by name (for softcapping, which is off here)
    model.config._attn_implementation = "sdpa"
    return model.eval()
