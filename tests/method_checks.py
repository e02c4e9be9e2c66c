"""Model-path checks every prefill method's tests share (tiny models, CPU): a method keeping
everything equals dense attention, and a sparse method answers alone as it does in a batch."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from tca_attention.integration import enable
from tca_attention.integration.adapter import cache_kwargs
from tiny_models import tiny


def run(model, ids, mask, steps, session=None):
    """Prefill + teacher-forced decode -> (prefill logits (B, L, V), decode logits (B, steps, V))."""
    return run_with_cache(model, ids, mask, steps, session)[:2]


def run_with_cache(model, ids, mask, steps, session=None):
    """run(), and the cache it filled -> (prefill logits, decode logits, cache)."""
    cache = session.new_cache() if session is not None else DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(cache))
    prefill, dec = out.logits, []
    for t in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=steps[:, t:t + 1], attention_mask=mask, position_ids=pos, **cache_kwargs(cache))
        dec.append(out.logits[:, -1])
    return prefill, torch.stack(dec, 1), cache


def assert_full_density_equals_dense(arch: str, method, steps_n: int = 10, new_tokens: int = 6) -> None:
    """`method` (at a density that keeps everything) on a tiny `arch` model, a left-padded batch of
    3: prefill and teacher-forced decode logits within 4x fp32 SDPA's error of an fp64 reference,
    a block plan really ran and kept everything, and greedy generate() equals dense token for token."""
    model = tiny(arch)
    B, L, pads = 3, 97, [0, 7, 30]
    ids = torch.randint(0, 97, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    steps = torch.randint(0, 97, (B, steps_n))
    valid = mask.bool()
    with torch.no_grad():
        ref64 = run(model.double(), ids, mask, steps)
        model.float()
        sdpa32 = run(model, ids, mask, steps)
        with enable(model, method) as session:
            got32 = run(model, ids, mask, steps, session)
            report = session.prefill_report()
            gen = session.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        dense_gen = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert report["kept_fraction"] == pytest.approx(1.0)
    assert any(r["kept_fraction"] is not None for r in session.last_prefill.values()), "no block plan ran"
    eps = torch.finfo(torch.float32).eps
    for i in (0, 1):
        r, s, t = ref64[i].float(), sdpa32[i], got32[i]
        if i == 0:
            r, s, t = r[valid], s[valid], t[valid]
        bound = 4 * float((s - r).abs().max()) + 64 * eps * float(r.abs().max())
        assert float((t - r).abs().max()) <= bound, ("prefill", "decode")[i]
    assert torch.equal(gen, dense_gen)


def assert_alone_equals_batched(method, lengths: tuple[int, ...] = (120, 75), new_tokens: int = 6) -> None:
    """A sparse `method` on a tiny llama: each prompt's greedy tokens are the same alone and
    left-padded in a batch."""
    model = tiny("llama").float()
    L = max(lengths)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 97, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for r, x in enumerate(rows):
        ids[r, L - len(x):], mask[r, L - len(x):] = x, 1
    with torch.no_grad(), enable(model, method) as session:
        batched = session.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert session.prefill_report()["kept_fraction"] < 1  # it is sparse
        for r, x in enumerate(rows):
            alone = session.generate(x[None], attention_mask=torch.ones_like(x[None]), max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=0)
            n = alone.shape[1] - len(x)  # alone stops at EOS; the batch pads that row after it
            assert torch.equal(batched[r, L:L + n], alone[0, len(x):]), r
            assert bool((batched[r, L + n:] == 0).all()), r
