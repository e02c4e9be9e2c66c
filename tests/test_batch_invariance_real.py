"""Batch invariance on the embedded real model (slow): SmolLM2 with its calibrated small-context
budgets (w = 512, b = 128) keeps the same tokens per head and answers the same, alone and in a
left-padded batch of three passkey prompts of different lengths.

Run: python -m pytest -q -m slow tests/test_batch_invariance_real.py
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tca_attention.methods.tca.budgets import Budgets
from tca_attention.data.passkey import passkey_prompt
from tca_attention.integration import enable
from tca_attention.methods.tca.method import TCA
from tca_attention.models import load_model
from test_batch_invariance import greedy as greedy_tiny

pytestmark = pytest.mark.slow

BUDGETS = Path(__file__).resolve().parents[1] / "docs/results/budgets/smollm2-small-context-8k.json"
STEPS = 48  # decode steps: every row's tail reaches w + b = 640 and compresses, each at its own step
# (prompt sizes chosen so: 1242, 994 and 748 tokens, tails of 602, 610 and 620 after the prefill,
# compressing at steps 38, 30 and 20)
SIZES = [(1248, 0.3), (1000, 0.6), (753, 0.5)]  # (passkey_prompt's n_tokens, depth)


def greedy(model, ids, mask, steps, session):
    """-> (logits of the last prompt token and of each step (B, 1 + steps, V), tokens, cache)."""
    prefill, logits, toks, cache = greedy_tiny(model, ids, mask, steps, session, prefill_keep=1)
    return torch.cat([prefill, logits], 1), toks, cache


def kept_positions(cache, r: int, shift: int) -> list[list[list[int]]]:
    """Per TCA layer and KV head, the sorted global positions row r holds (minus its padding)."""
    out = []
    for layer in cache.tca_layers():
        KV = layer.t_keys.shape[1]
        out.append([sorted((layer.g_pos[layer.g_offsets[r * KV + h] : layer.g_offsets[r * KV + h + 1]] - shift).tolist())
                    for h in range(KV)])
    return out


def test_smollm2_passkey_prompts_alone_equal_batched():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = load_model("smollm2")
    budgets = Budgets.load(BUDGETS, model=model)
    assert budgets.config.window == 512 and budgets.config.block_size == 128
    prompts = [passkey_prompt(tok, n, depth=d, seed=i) for i, (n, d) in enumerate(SIZES)]
    seqs = [tok(p.text, return_tensors="pt")["input_ids"][0] for p in prompts]
    lengths = [len(s) for s in seqs]
    assert min(lengths) > 512 + 128 and len(set(lengths)) == 3, lengths  # every row sparse, all different
    L = max(lengths)
    ids = torch.full((3, L), int(tok.pad_token_id or 0), dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, L - len(s):], mask[r, L - len(s):] = s, 1
    with torch.no_grad(), enable(model, TCA(budgets), backend="reference") as session:
        b_logits, b_toks, b_cache = greedy(model, ids, mask, STEPS, session)
        b_kept = [kept_positions(b_cache, r, L - n) for r, n in enumerate(lengths)]
        for r, s in enumerate(seqs):
            a_logits, a_toks, a_cache = greedy(model, s[None], torch.ones(1, len(s), dtype=torch.long), STEPS, session)
            answer = tok.decode(a_toks[0].tolist(), skip_special_tokens=True)
            assert torch.equal(b_toks[r], a_toks[0]), (r, answer, tok.decode(b_toks[r].tolist()))
            assert b_kept[r] == kept_positions(a_cache, 0, 0), f"row {r}: kept sets differ"
            err = float((b_logits[r] - a_logits[0]).abs().max())
            assert err <= 1e-3 * float(a_logits.abs().max()), (r, err)
            print(f"row {r}: {lengths[r]} tokens, answer {answer[:24]!r} (passkey {prompts[r].answer}), "
                  f"kept {sum(len(h) for l in b_kept[r] for h in l)} global slots, max logit diff {err:.2e}")
            # decode compressed this row's tail (at its own step: the rows' tails differ in length)
            local_start = (len(s) - 512) // 128 * 128
            assert all(layer.t_pos0 >= local_start + 128 for layer in a_cache.tca_layers()), r
