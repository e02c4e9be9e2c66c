"""Checks the decode-side peers' tests share (TokenSelect, TidalDecode, Recycled Attention; Quest for the
static path): layers driven by hand (dense prefill, random decode steps), a selection path covering the
cache equals dense decoding on a tiny model, a row reads the same tokens alone and in a left-padded
batch, and static (graph-safe) decode steps give the dynamic path's tokens."""
from __future__ import annotations

import pytest
import torch
from method_checks import run

from tca_attention.integration import enable
from tca_attention.ragged_cache import RaggedLayer
from tiny_models import tiny

KV, G, D = 2, 3, 16  # KV heads, group size, head dim of the layer-level tests


def padded(lengths: list[int], gen: torch.Generator, L: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random (B, KV, L, D) keys with junk in the padding (it would win every score if it
    were scored), and key_start (B,)."""
    L = L or max(lengths)
    x = torch.randn(len(lengths), KV, L, D, generator=gen)
    for r, n in enumerate(lengths):
        x[r, :, : L - n] = 50.0
    return x, torch.tensor([L - n for n in lengths])


def prefill_layer(k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor, method, layer_idx: int = 0) -> RaggedLayer:
    layer = RaggedLayer(method.block_size, method.window, backend="reference")
    layer.update(k, v)
    method.plan(layer_idx, None, k, key_start, 1.0)
    layer.commit_prefill(None, key_start, method.decode_keep(layer_idx, k.shape[1]))
    return layer


def read_slots(sel, layer: RaggedLayer, r: int) -> list[set[int]]:
    """Per KV head, the tail slots row r reads (every real slot when sel is None)."""
    if sel is None:
        return [set(range(int(layer.t_first[r]), layer.t_fill))] * layer.t_keys.shape[1]
    mask = sel.tail_mask(layer.t_fill)[r]
    return [set(torch.nonzero(m).flatten().tolist()) for m in mask]


def decode_step(layers: list[RaggedLayer], method, kn, vn, q) -> tuple[list, list[torch.Tensor]]:
    """One decode step through `layers` (model layers 0, 1, ...), every layer given the same new
    key/value and query. -> (selections, outputs)."""
    sels, outs = [], []
    for i, layer in enumerate(layers):
        layer.update(kn, vn)
        sel = method.select_decode(i, q, layer)
        if sel is not None:
            sel.validate(layer.view(torch.zeros(q.shape[0], 1, dtype=torch.long)))
        sels.append(sel)
        outs.append(layer.attend(q, D**-0.5, sel))
    return sels, outs


def assert_layers_alone_equal_batched(make, lengths: list[int], steps: int, n_layers: int = 1, seed: int = 5,
                                      q_fn=None) -> list:
    """The same keys and queries through left-padded batch layers and each row's own layers: the same
    tokens read (shifted by the padding) at every step and layer, and the same outputs.
    q_fn(step, gen, B) gives the step's queries (default: random). -> the batch's selections."""
    gen = torch.Generator().manual_seed(seed)
    L, B = max(lengths), len(lengths)
    k, key_start = padded(lengths, gen)
    v = torch.randn_like(k)
    batched_m, alone_m = make(), [make() for _ in lengths]
    batched = [prefill_layer(k, v, key_start, batched_m, i) for i in range(n_layers)]
    alone = [[prefill_layer(k[r:r + 1, :, L - n:], v[r:r + 1, :, L - n:], torch.zeros(1, dtype=torch.long), alone_m[r], i)
              for i in range(n_layers)] for r, n in enumerate(lengths)]
    log = []
    for t in range(steps):
        kn, vn = (torch.randn(B, KV, 1, D, generator=gen) for _ in range(2))
        q = torch.randn(B, KV * G, 1, D, generator=gen) if q_fn is None else q_fn(t, gen, B)
        sels, outs = decode_step(batched, batched_m, kn, vn, q)
        log.append(sels)
        for r in range(B):
            sels_a, outs_a = decode_step(alone[r], alone_m[r], kn[r:r + 1], vn[r:r + 1], q[r:r + 1])
            s = int(key_start[r])
            for i in range(n_layers):
                got = [{x - s for x in h} for h in read_slots(sels[i], batched[i], r)]
                assert got == read_slots(sels_a[i], alone[r][i], 0), (t, r, i)
                torch.testing.assert_close(outs[i][r], outs_a[i][0], rtol=1e-5, atol=1e-6)
    return log


class Recording:
    """Wraps a method's select_decode to log every selection; can turn off the dense shortcuts for caches
    (and rows) within the budget, so that the selection path itself runs."""

    def __init__(self, method, dense_shortcut: bool = True) -> None:
        self.log: list = []
        if not dense_shortcut:
            object.__setattr__(method, "_fits", lambda fill: False)
            if hasattr(method, "_row_fits"):
                object.__setattr__(method, "_row_fits", lambda n: torch.zeros_like(n, dtype=torch.bool))
        inner = method.select_decode

        def select(layer_idx, q, layer):
            sel = inner(layer_idx, q, layer)
            self.log.append((layer_idx, sel))
            return sel

        object.__setattr__(method, "select_decode", select)


def assert_covering_budget_equals_dense(method, arch: str = "llama", **tiny_kw) -> Recording:
    """`method` with a budget covering every cache, the dense shortcut off: teacher-forced decode
    logits of a left-padded batch within 4x fp32 SDPA's error of an fp64 reference, prefill equal to
    SDPA's, and greedy generate() equal to dense token for token."""
    rec = Recording(method, dense_shortcut=False)
    model = tiny(arch, **tiny_kw)
    gen = torch.Generator().manual_seed(3)
    B, L, pads, n_steps = 3, 50, [0, 7, 30], 12
    ids = torch.randint(0, 97, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    steps = torch.randint(0, 97, (B, n_steps), generator=gen)
    with torch.no_grad():
        ref64 = run(model.double(), ids, mask, steps)[1].float()
        model.float()
        sdpa32 = run(model, ids, mask, steps)[1]
        with enable(model, method, backend="reference") as session:
            got32 = run(model, ids, mask, steps, session)[1]
            toks = session.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        dense = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert any(sel is not None for _, sel in rec.log), "no selection ran"
    eps = torch.finfo(torch.float32).eps
    bound = 4 * float((sdpa32 - ref64).abs().max()) + 64 * eps * float(ref64.abs().max())
    assert float((got32 - ref64).abs().max()) <= bound
    assert torch.equal(toks, dense)
    return rec


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):], mask[r, L - len(p):] = p, 1
    return ids, mask


def assert_model_alone_equals_batched(method, lengths=(90, 77, 48), new_tokens: int = 10, **tiny_kw) -> None:
    """Greedy generate() of a left-padded batch equals each prompt's own run token for token, and the
    method really selected (some step read less than the whole cache)."""
    rec = Recording(method)
    model = tiny("llama", **tiny_kw).float()
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in lengths]
    ids, mask = left_padded(prompts)
    with torch.no_grad(), enable(model, method, backend="reference") as session:
        batched = session.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        for r, p in enumerate(prompts):
            alone = session.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[r, ids.shape[1]:], alone[0, len(p):]), r
    assert any(sel is not None for _, sel in rec.log)
    assert method.report()["decode_kept_fraction"] < 1


def assert_triton_equals_reference(method, lengths=(45, 38, 6), seed: int = 6) -> None:
    """One layer's token-level selection of a padded batch through the Triton decode kernel (the
    interpreter without CUDA) equals the reference executor."""
    from kernel_helpers import DEV

    from tca_attention.engine import dispatch

    gen = torch.Generator().manual_seed(seed)
    k, key_start = padded(list(lengths), gen)
    layer = prefill_layer(k.to(DEV), torch.randn_like(k).to(DEV), key_start.to(DEV), method)
    kn = torch.randn(len(lengths), KV, 1, D, generator=gen).to(DEV)
    layer.update(kn, kn)
    q = torch.randn(len(lengths), KV * G, 1, D, generator=gen).to(DEV)
    sel = method.select_decode(0, q, layer)
    assert sel is not None and sel.page_size == 1 and (sel.pages == -1).any()
    view = layer.view(torch.full((len(lengths), 1), layer.seen - 1, device=DEV))
    ref = dispatch.ragged_decode(q, view, D**-0.5, "reference", selection=sel)
    out = dispatch.ragged_decode(q, view, D**-0.5, "triton", selection=sel)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)


def _reads_logged(method) -> list[torch.Tensor]:
    """Wrap method.select_decode to log what every call reads: (B, KV, positions so far) bool, the
    visible tail slots of its selection (all visible ones for None)."""
    log: list[torch.Tensor] = []
    inner = method.select_decode

    def select(layer_idx, q, layer):
        sel = inner(layer_idx, q, layer)
        pos = layer.tail_positions()  # (B, T): slot = position (these methods never compress)
        B, KV, T = pos.shape[0], layer.t_keys.shape[1], pos.shape[1]
        read = sel.tail_mask(T) if sel is not None else torch.ones(B, KV, T, dtype=torch.bool)
        log.append((read & (pos >= 0)[:, None, :])[..., : layer.seen])
        return sel

    object.__setattr__(method, "select_decode", select)
    return log


def assert_static_equals_dynamic(make, lengths: tuple[int, ...], steps: int = 14, **tiny_kw) -> tuple[dict, dict]:
    """Greedy decoding of a tiny llama with static steps (greedy_static, eager on the CPU: what a CUDA
    graph replays) reads the same tokens at every step and layer as the dynamic path and gives its
    tokens over `steps` steps, with the same read fraction, below 1 (the method dropped something).
    make(): a fresh method (its counters start at zero). -> the session reports (dynamic, static)."""
    from test_batch_invariance import greedy
    from test_static_decode import left_padded as padded_prompts

    from tca_attention.integration.static_decode import greedy_static

    model = tiny("llama", **tiny_kw)
    ids, mask = padded_prompts(lengths)
    with torch.no_grad():
        with enable(model, make(), backend="reference") as session:
            want_reads = _reads_logged(session.method)
            _, _, want, _ = greedy(model, ids, mask, steps, session)
            dynamic = session.prefill_report()
        with enable(model, make(), backend="reference") as session:
            assert session.method.supports_static_decode()
            reads = _reads_logged(session.method)
            run = greedy_static(model, ids, mask, max_new_tokens=steps + 1, session=session, cuda_graph=False)
            static = session.prefill_report()
    assert torch.equal(run.sequences[:, ids.shape[1]:-1], want)
    assert len(reads) == len(want_reads) > 0 and all(torch.equal(a, b) for a, b in zip(reads, want_reads))
    frac = static["decode_kept_fraction"]
    assert frac == pytest.approx(dynamic["decode_kept_fraction"], rel=1e-9) and frac < 1
    return dynamic, static
