"""Selection semantics on hand-built inputs where the right answer is known."""
import math

import pytest
import torch

from tca_attention.engine.plan import pack_mask
from tca_attention.methods.tca import selection as sel
from tca_attention.methods.tca.candidates import candidate_ladder, decode_keep, expected_keep, keep_counts
from tca_attention.methods.tca.config import TCAConfig
from tca_attention.methods.base import local_geometry
from tca_attention.methods.tca.method import select_tokens


def test_ladder_shape_order_and_normalisation():
    p = candidate_ladder(128, 1.0)
    assert p.shape == (14, 8)
    assert torch.allclose(p.sum(1), torch.ones(14, dtype=p.dtype))
    ek = expected_keep(p, 128)
    assert bool((ek[1:] >= ek[:-1]).all()), "candidates must be ordered cheapest first"
    # mu = 0 puts the mode on k = 1 (last column), the most expensive mode on k = 128 (first)
    assert int(p[0].argmax()) == 7 and int(p[-1].argmax()) == 0
    assert keep_counts(128) == [128, 64, 32, 16, 8, 4, 2, 1]


def test_redundancy_metric_values():
    b = 4
    uniform = torch.full((b,), 0.25)
    single = torch.tensor([1.0, 0, 0, 0])
    empty = torch.zeros(b)
    h = sel.block_redundancy(torch.stack([uniform, single, empty]), alpha=0.5)
    # uniform: mass 1, concentration 1 - 4*(1/16)/1 = 0.75 ; single: mass 1, conc 0 ; empty: 0
    assert torch.allclose(h, torch.tensor([0.5 * 1 + 0.5 * 0.75, 0.5, 0.0]))
    assert torch.allclose(sel.block_redundancy(torch.stack([uniform * 0.2]), alpha=0.0), torch.tensor([0.2]))


@pytest.mark.parametrize("n", [1, 7, 13, 100])
def test_bucket_sizes_sum_to_n_and_follow_p(n):
    p = candidate_ladder(128)
    sizes = sel.bucket_sizes(p, n)
    assert bool((sizes >= 0).all())
    assert torch.equal(sizes.sum(-1), torch.full((14,), n))
    # cumulative rounding: first bucket is round(n * p_b)
    assert torch.equal(sizes[:, 0], torch.round(p[:, 0] * n).long())


def test_keep_per_rank_and_block_assignment():
    p = torch.tensor([[0.25, 0.0, 0.5, 0.25]], dtype=torch.float64)  # keep counts [8, 4, 2, 1], b = 8
    keep_rank = sel.keep_per_rank(p, 4, 8)
    assert keep_rank.tolist() == [[8, 2, 2, 1]]
    h = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    assert sel.keep_per_block(h, keep_rank).tolist() == [[1, 8, 2, 2]]


def test_topk_within_blocks_and_pack():
    s = torch.tensor([[[0.1, 0.4, 0.2, 0.3], [0.9, 0.0, 0.05, 0.05]]])  # (1, n=2, b=4)
    mask = sel.topk_within_blocks(s, torch.tensor([[2, 1]]))
    assert mask.tolist() == [[[False, True, False, True], [True, False, False, False]]]
    idx, ln = pack_mask(mask.reshape(1, 8))
    assert idx.tolist() == [[1, 3, 4]] and ln.tolist() == [3]
    idx, ln = pack_mask(torch.tensor([[True, False, False], [False, False, False]]))
    assert idx.tolist() == [[0], [3]] and ln.tolist() == [1, 0]


def test_gqa_importance_is_mean_of_group_softmaxes():
    q = torch.randn(1, 4, 8)
    k = torch.randn(1, 2, 10, 8)
    s = sel.last_query_importance(q, k, None, 0.5)
    for h in range(2):
        rows = [torch.softmax((q[0, g] @ k[0, h].T) * 0.5, -1) for g in (2 * h, 2 * h + 1)]
        assert torch.allclose(s[0, h], (rows[0] + rows[1]) / 2, atol=1e-6)
    valid = torch.arange(10)[None] >= 3
    s = sel.last_query_importance(q, k, valid, 0.5)
    assert float(s[0, :, :3].abs().max()) == 0.0 and torch.allclose(s.sum(-1), torch.ones(1, 2))


@pytest.mark.parametrize("L,expected", [(70, None), (64 + 16, None), (64 + 16 + 1, (1, 16)), (64 + 16 * 3 + 5, (3, 48))])
def test_local_geometry_window_and_remainder(L, expected):
    assert local_geometry(L, 16, 64) == expected
    if expected:
        n, ls = expected
        assert 64 <= L - ls < 64 + 16  # local region = window + remainder that fills no block


def test_select_tokens_counts_follow_budget():
    torch.manual_seed(3)
    s = torch.softmax(torch.randn(2, 3, 10 * 16), -1)
    p = candidate_ladder(16)[[0, 3, 5]]  # three heads, three budgets
    mask, keep = select_tokens(s, p, 10, 16, 0.5)
    sizes = sel.bucket_sizes(p, 10)
    kc = torch.tensor(keep_counts(16))
    assert torch.equal(mask.sum(-1), (sizes * kc).sum(-1).expand(2, 3))
    assert bool((keep >= 1).all()), "every block keeps at least one token"
    # the kept tokens of a block are its top ones by s
    blocks = s.reshape(2, 3, 10, 16)
    m = mask.reshape(2, 3, 10, 16)
    kept_min = torch.where(m, blocks, torch.full_like(blocks, 2.0)).amin(-1)
    drop_max = torch.where(~m, blocks, torch.full_like(blocks, -1.0)).amax(-1)
    assert bool((kept_min >= drop_max).all())


def test_decode_keep_is_floor_of_expected_keep():
    p = candidate_ladder(128)
    for row in p:
        assert decode_keep(row, 128) == math.floor(float(expected_keep(row, 128)) + 1e-9)


@pytest.mark.parametrize("bad", [dict(block_size=100), dict(block_size=1), dict(tau=0.0), dict(tau=1.5),
                                 dict(alpha=-0.1), dict(window=0), dict(score="x"), dict(sigma=0)])
def test_config_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        TCAConfig(**bad)
