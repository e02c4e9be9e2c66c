"""Shared parts of the needle diagnoses (scripts/diag_*_needle.py): the suite's niah_single prompt
with the token positions of its needle, and a greedy answer with or without a method."""
from __future__ import annotations

import torch

from tca_attention.eval.tasks import generate
from tca_attention.integration import enable


def needle_prompt(tok, fmt, ctx, i: int, length: int) -> tuple[list[int], list[int], list[int], object]:
    """ids, the needle sentence's tokens, the value's tokens, the sample."""
    s = generate(ctx, "niah_single", length, i)
    text = fmt.render(s)
    enc = tok(text, add_special_tokens=fmt._special(s.use_template), return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    needle = s.metadata["needles"][0]
    c0 = text.index(needle)
    v0 = text.index(s.answers[0], c0)

    def covering(a: int, n: int) -> list[int]:
        return [t for t, (x, y) in enumerate(offs) if x < a + n and y > a]

    return ids, covering(c0, len(needle)), covering(v0, len(s.answers[0])), s


def answer(model, tok, ids, s, method=None, backend: str = "auto") -> str:
    """The greedy answer to one prompt: plain attention (method None) or through `method`."""
    x = torch.tensor([ids])
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=s.max_new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if method is None:
            g = model.generate(x, **kw)
        else:
            with enable(model, method, backend=backend) as session:
                g = session.generate(x, **kw)
    return tok.decode(g[0, len(ids):], skip_special_tokens=True)


def rotated_qk_hook(caps: dict, i: int):
    """A forward hook (with_kwargs) of a Llama-style attention module storing its rotated (q, k),
    each (B, H, L, D), as caps[i]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def hook(mod, a, kwargs, out):
        hs, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
        B, L, _ = hs.shape
        q = mod.q_proj(hs).view(B, L, -1, mod.head_dim).transpose(1, 2)
        k = mod.k_proj(hs).view(B, L, -1, mod.head_dim).transpose(1, 2)
        caps[i] = apply_rotary_pos_emb(q, k, cos, sin)
    return hook
