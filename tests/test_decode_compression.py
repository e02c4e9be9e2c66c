"""Decode compression timing and ranking on a hand-built ragged cache layer."""
import torch

from tca_attention.ragged_cache import RaggedLayer


def test_compresses_when_tail_reaches_window_plus_block_and_keeps_top_attended():
    b, w, D = 4, 8, 8
    layer = RaggedLayer(block_size=b, window=w, backend="reference")
    B, KV, H = 1, 2, 4  # GQA: 2 query heads per KV head
    L = 10
    k = torch.zeros(B, KV, L, D)
    v = torch.randn(B, KV, L, D)
    # keys 0..3 form the first block to be compressed; make head 0 attend to keys 1 and 3,
    # head 1 to keys 0 and 2 (through the one-hot query below)
    k[0, 0, 1, 0] = k[0, 0, 3, 0] = 5.0
    k[0, 0, 3, 0] = 6.0
    k[0, 1, 0, 1] = 5.0
    k[0, 1, 2, 1] = 6.0
    layer.update(k, v)
    layer.commit_prefill(None, torch.zeros(1, dtype=torch.long), torch.tensor([2, 1]))
    assert layer.t_fill == L and layer.g_pos.numel() == 0
    q = torch.zeros(B, H, 1, D)
    q[0, :2, 0, 0] = 1.0  # heads of KV 0 look along dim 0
    q[0, 2:, 0, 1] = 1.0  # heads of KV 1 look along dim 1
    # tail holds 10; steps 1 adds 11 tokens: no compression yet
    layer.update(torch.zeros(B, KV, 1, D), torch.zeros(B, KV, 1, D))
    layer.attend(q, 1.0)
    assert layer.t_fill == 11 and layer.g_pos.numel() == 0
    # step 2 reaches w + b = 12: attend, then compress the oldest block [0, 4)
    layer.update(torch.zeros(B, KV, 1, D), torch.zeros(B, KV, 1, D))
    out = layer.attend(q, 1.0)
    assert out.shape == (B, 1, H, D)
    assert layer.t_fill == w and layer.t_pos0 == b and layer.seen == 12
    seg0 = layer.g_pos[layer.g_offsets[0] : layer.g_offsets[1]].tolist()
    seg1 = layer.g_pos[layer.g_offsets[1] : layer.g_offsets[2]].tolist()
    assert sorted(seg0) == [1, 3], "head 0 keeps its 2 most attended tokens of the block"
    assert seg1 == [2], "head 1 keeps its single most attended token"
    # kept keys/values are the originals
    i0 = layer.g_offsets[0] + seg0.index(3)
    assert torch.equal(layer.g_keys[i0], k[0, 0, 3]) and torch.equal(layer.g_values[i0], v[0, 0, 3])
    # the next compression comes b steps later, not before
    for step in range(b - 1):
        layer.update(torch.zeros(B, KV, 1, D), torch.zeros(B, KV, 1, D))
        layer.attend(q, 1.0)
        assert layer.g_pos.numel() == 3
    layer.update(torch.zeros(B, KV, 1, D), torch.zeros(B, KV, 1, D))
    layer.attend(q, 1.0)
    assert layer.g_pos.numel() == 6 and layer.t_pos0 == 2 * b


def test_decode_attention_sees_exactly_global_plus_tail():
    """One decode query equals dense attention restricted to the kept positions."""
    torch.manual_seed(0)
    b, w, D = 4, 8, 16
    layer = RaggedLayer(block_size=b, window=w, backend="reference")
    k, v = torch.randn(1, 1, 12, D), torch.randn(1, 1, 12, D)
    layer.update(k, v)
    layer.commit_prefill(None, torch.zeros(1, dtype=torch.long), torch.tensor([1]))
    q = torch.randn(1, 2, 1, D)
    k1, v1 = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    layer.update(k1, v1)
    layer.attend(q, 0.25)  # compresses block [0, 4) to 1 token
    kept = layer.g_pos.tolist() + list(range(4, 13))
    allk, allv = torch.cat([k, k1], 2)[0, 0], torch.cat([v, v1], 2)[0, 0]
    q2 = torch.randn(1, 2, 1, D)
    k2, v2 = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    layer.update(k2, v2)
    out = layer.attend(q2, 0.25)
    keys = torch.cat([allk[kept], k2[0, 0]]); vals = torch.cat([allv[kept], v2[0, 0]])
    ref = torch.softmax(q2[0, :, 0] @ keys.T * 0.25, -1) @ vals  # (2, D)
    assert torch.allclose(out[0, 0], ref, atol=1e-5)
