"""The sparse path with nothing dropped equals dense attention, prefill and decode.

Tolerance is derived from the dtype: a float64 SDPA run is the oracle, and the sparse path in
float32 must be within a small multiple of plain float32 SDPA's own error against it.
"""
import pytest
import torch
from transformers.cache_utils import DynamicCache

from tca_attention.integration import enable
from tca_attention.methods.full_budget import FullBudget
from tca_attention.integration.adapter import cache_kwargs
from tiny_models import ARCHS, tiny

STEPS = 50


def run(model, ids, mask, steps, session=None):
    """Prefill + teacher-forced decode. -> (prefill logits (B, L, V), decode logits (B, steps, V))."""
    cache = session.new_cache() if session is not None else DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(cache))
    prefill = out.logits
    dec = []
    for t in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=steps[:, t : t + 1], attention_mask=mask, position_ids=pos, **cache_kwargs(cache))
        dec.append(out.logits[:, -1])
    return prefill, torch.stack(dec, 1), cache


def batch(B, L, pads, vocab=97):
    ids = torch.randint(0, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return ids, mask, torch.randint(0, vocab, (B, STEPS))


@pytest.mark.compat
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("B,pads", [(1, [0]), (3, [0, 7, 30])])
def test_full_budget_matches_sdpa(arch, B, pads):
    model = tiny(arch)
    impl = model.config._attn_implementation
    L = 97  # not a multiple of the block
    ids, mask, steps = batch(B, L, pads)
    valid = mask.bool()
    with torch.no_grad():
        ref64 = run(model.double(), ids, mask, steps)
        model.float()
        sdpa32 = run(model, ids, mask, steps)
        with enable(model, FullBudget(window=24, block_size=8)) as session:
            tca32 = run(model, ids, mask, steps, session)
    cache = tca32[2]
    assert cache.tca_layers() and all(l.g_pos.numel() > 0 for l in cache.tca_layers()), "compression never ran"
    eps = torch.finfo(torch.float32).eps
    for i in (0, 1):
        r, s, t = ref64[i].float(), sdpa32[i], tca32[i]
        if i == 0:
            r, s, t = r[valid], s[valid], t[valid]
        err_sdpa = float((s - r).abs().max())
        err_tca = float((t - r).abs().max())
        bound = 4 * err_sdpa + 64 * eps * float(r.abs().max())
        assert err_tca <= bound, f"{'prefill' if i == 0 else 'decode'}: {err_tca:.2e} > {bound:.2e}"
    assert model.config._attn_implementation == impl, "leaving the session must restore the implementation"


def test_the_plan_needs_no_host_read_and_packs_what_pack_mask_finds():
    """FullBudget's plan gives pack_mask the unpadded row's count (no read of the counts: a host
    sync per layer on a GPU); the kept sets equal those pack_mask finds by itself, padded rows too;
    a max_len above the counts only pads."""
    from tca_attention.engine.plan import pack_mask
    from tca_attention.methods.base import global_region, row_geometry

    m = FullBudget(window=16, block_size=8)
    B, KV, L = 3, 2, 70
    key_start = torch.tensor([0, 9, 30])
    k = torch.randn(B, KV, L, 4)
    saved = torch.Tensor.__int__
    torch.Tensor.__int__ = lambda self: (_ for _ in ()).throw(AssertionError("host read"))
    try:
        plan = m.plan(0, torch.randn(B, 4, L, 4), k, key_start, 0.5, padded=True)
    finally:
        torch.Tensor.__int__ = saved
    _, row_ls = row_geometry(L, key_start, 8, 16)
    idx, lens = pack_mask(global_region(L, key_start, row_ls)[:, None, :].expand(B, KV, L))
    assert torch.equal(plan.kept_len, lens) and plan.kept_idx.shape[-1] == idx.shape[-1] == int(lens.max())
    assert torch.equal(plan.kept_idx, idx)
    few = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    wide, n = pack_mask(few, max_len=5)  # room beyond the counts: padding N
    assert wide.tolist() == [[0, 2, 6, 6, 6], [1, 2, 3, 6, 6]] and n.tolist() == [2, 3]
