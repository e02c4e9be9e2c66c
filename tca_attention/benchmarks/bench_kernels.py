"""Kernel benchmark: TCA prefill/decode against dense SDPA backends on Llama-3.1-8B head shapes.

Per layer, batch 1, 32 query heads, 8 KV heads, head dim 128, bf16, contexts 8K..128K (256K
where memory and time allow):
  prefill  dense SDPA (cuDNN, flash, memory-efficient, FlexAttention causal) vs TCA at kept
           fractions 10/25/39/60% (random ragged budgets per head averaging the fraction,
           window 4096, block 128, plans built by the real selection code from random q/k),
           selection and attention timed separately and together;
  decode   one query over the full cache: dense SDPA (flash and the others) vs the TCA ragged
           decode over the compressed cache, with the KV bytes each reads.
Effective TFLOP/s count only visible (query, key) pairs: L(L+1)/2 per head for dense causal,
the plan's exact kept pairs for TCA. Writes JSON (+ PNG plots) under --out.

Run: tca bench kernels --out DIR   (or python -m tca_attention.benchmarks.bench_kernels --out DIR)
Plots again from a JSON (no GPU needed): tca bench kernels --plot-only DIR/kernels_bench.json --out DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..clihelp import HelpFormatter
from . import require_cuda
from ..engine.timing import bench_ms

log = logging.getLogger("bench_kernels")

H, KV, D = 32, 8, 128
DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# plans: per-head budgets and the real selection code
def head_budgets(frac: float, L: int, window: int, block: int, gen: torch.Generator) -> torch.Tensor:
    """Per KV head keep distributions p (KV, |K|) whose kept fractions average `frac` of L.

    Heads get random global densities (0.5x..1.5x of the mean) realised by mixing neighbouring
    rows of the candidate ladder (extended by "all keep 1" and "all keep b").
    """
    from tca_attention.methods.tca.candidates import candidate_ladder, expected_keep

    n = (L - window) // block
    ls = n * block
    fg = (frac * L - (L - ls)) / ls  # global density needed
    u = torch.rand(KV, generator=gen, dtype=torch.float64)
    t = fg * (0.5 + u) / (0.5 + u).mean()
    t = t.clamp(1.0 / block, 1.0)
    ladder = candidate_ladder(block)
    nk = ladder.shape[1]
    ones = torch.zeros(1, nk, dtype=torch.float64)
    ones[0, -1] = 1.0  # every block keeps 1
    full = torch.zeros(1, nk, dtype=torch.float64)
    full[0, 0] = 1.0  # every block keeps b
    ext = torch.cat([ones, ladder, full])
    e = expected_keep(ext, block) / block  # ascending
    i = torch.searchsorted(e, t).clamp(1, len(e) - 1)
    w = ((t - e[i - 1]) / (e[i] - e[i - 1])).clamp(0, 1)[:, None]
    return (1 - w) * ext[i - 1] + w * ext[i]


class Selector:
    """TCA.plan's selection for one layer: TS.select_and_pack_window with the keep count per rank
    and the output width built once on the host (as TCA caches them), so timing a call measures
    exactly what TCA runs per prefill. backend: "triton" (fused, no sync) or "reference";
    last_q, union, span: TCA's options last_q, gqa="union" and span (1, False, 1: the paper's rule)."""

    def __init__(self, p: torch.Tensor, L: int, window: int, block: int, alpha: float, backend: str = "triton",
                 last_q: int = 1, union: bool = False, span: int = 1):
        from tca_attention.methods.tca.selection import keep_per_rank

        self.n = (L - window) // block
        self.block, self.window, self.alpha, self.backend = block, window, alpha, backend
        self.last_q, self.union, self.span = last_q, union, span
        kr = keep_per_rank(p.cpu(), self.n, block)  # (KV, n)
        self.max_kept = int(kr.sum(-1).max())
        self.keep_rank = kr.to(device=p.device, dtype=torch.int32)
        ks = torch.tensor([block >> i for i in range(p.shape[-1])], dtype=p.dtype, device=p.device)
        self.decode_keep = torch.floor((p * ks).sum(-1) + 1e-9).long()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scaling: float):
        """q (B, H, L, D), k (B, KV, L, D) -> TokenPlan (no padding: key_start 0)."""
        from tca_attention.engine.plan import TokenPlan
        from tca_attention.methods.tca import select as TS

        B = q.shape[0]
        key_start = torch.zeros(B, dtype=torch.long, device=q.device)
        g = q.shape[1] // k.shape[1]
        width = min(g * self.max_kept, self.n * self.block) if self.union else self.max_kept
        spec = TS.SelectionSpec(key_start, self.keep_rank, self.n, self.block, self.alpha, "sum", width, self.span)
        idx, lens, retained, _ = TS.select_and_pack_window(q[:, :, -self.last_q:], k, spec, scaling, self.window,
                                                           self.union, backend=self.backend)
        total = None if self.union else B * int(self.keep_rank.sum())
        return TokenPlan(idx, lens, self.n * self.block, self.window, self.block, key_start, self.decode_keep,
                         retained, kept_total=total)


def tca_select(q: torch.Tensor, k: torch.Tensor, p: torch.Tensor, window: int, block: int, alpha: float, scaling: float,
               backend: str = "triton"):
    """One-off plan with the library's selection (builds a Selector: do not time this, time the Selector)."""
    return Selector(p, q.shape[2], window, block, alpha, backend)(q, k, scaling)


def selection_breakdown(q, k, p, window: int, block: int, alpha: float, scaling: float) -> dict[str, float]:
    """Median ms of each launch group of the fused selection (triton_select's steps) and of each
    step of the PyTorch reference, plus both whole calls, to see where selection time goes."""
    from tca_attention.engine.plan import pack_mask
    from tca_attention.methods.tca import selection as S
    from tca_attention.methods.tca import triton_select as T

    sel_t = Selector(p, q.shape[2], window, block, alpha, "triton")
    sel_r = Selector(p, q.shape[2], window, block, alpha, "reference")
    n, ls, B, kv = sel_t.n, sel_t.n * block, q.shape[0], k.shape[1]
    q_last = q[:, :, -1]
    ks = torch.zeros(B, dtype=torch.long, device=q.device)
    lg = T.step_logits(q_last, k, ks, scaling)
    s, mass, h = T.step_importance(*lg, n, block, alpha, "sum")
    keep = T.step_keep(h, sel_t.keep_rank)
    chosen, count, csum = T.step_select(s, keep, ks, mass.clone(), n, block, kv)
    triton_steps = {
        "A_logits": lambda: T.step_logits(q_last, k, ks, scaling),
        "B_importance": lambda: T.step_importance(*lg, n, block, alpha, "sum"),
        "argsort_scatter": lambda: T.step_keep(h, sel_t.keep_rank),
        "C_select_cumsum": lambda: T.step_select(s, keep, ks, mass.clone(), n, block, kv),
        "D_pack": lambda: T.step_pack(chosen, count, csum, n, block, sel_t.max_kept),
        "total": lambda: sel_t(q, k, scaling),
    }
    sr = s.view(B, kv, -1)
    sb = sr[..., :ls].reshape(B, kv, n, block)
    hj = S.block_redundancy(sb, alpha)
    kr = sel_r.keep_rank.long()
    kpb = S.keep_per_block(hj, kr.expand(B, kv, n))
    mask = S.topk_within_blocks(sb, kpb).reshape(B, kv, ls)
    ref_steps = {
        "last_query_importance": lambda: S.last_query_importance(q_last, k, None, scaling),
        "block_redundancy": lambda: S.block_redundancy(sb, alpha),
        "keep_per_block": lambda: S.keep_per_block(hj, kr.expand(B, kv, n)),
        "topk_within_blocks": lambda: S.topk_within_blocks(sb, kpb),
        "pack_mask": lambda: pack_mask(mask),
        "total": lambda: sel_r(q, k, scaling),
    }
    out = {f"triton/{name}": bench_ms(fn, target_ms=50)["median_ms"] for name, fn in triton_steps.items()}
    out.update({f"reference/{name}": bench_ms(fn, target_ms=50)["median_ms"] for name, fn in ref_steps.items()})
    return out


def kept_pairs(plan, L: int) -> int:
    """Visible (query, key) pairs summed over (b, kv head) under a plan (key_start 0)."""
    from tca_attention.engine.plan import band_start

    dev = plan.kept_idx.device
    B, kv, M = plan.kept_idx.shape
    j = torch.arange(L, device=dev)
    lo = band_start(j, plan.window, plan.local_start)  # (L,)
    ar = torch.arange(M, device=dev)
    flat = torch.where(ar < plan.kept_len[..., None].long(), plan.kept_idx, torch.full_like(plan.kept_idx, L))
    flat = flat.reshape(B * kv, M).contiguous()  # (B*KV, M)
    far = torch.searchsorted(flat, lo.expand(B * kv, L).contiguous()).sum()
    band = (j - lo.clamp_min(0) + 1).sum() * B * kv
    return int(far + band)


# ---------------------------------------------------------------------------------------------
# dense baselines
def sdpa_fn(backend_name: str, q, k, v, causal: bool, scaling: float):
    """A zero-arg SDPA call on one backend; GQA native where the backend takes it, else expanded."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]
    F = torch.nn.functional

    def native():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scaling, enable_gqa=True)

    try:
        native()
        torch.cuda.synchronize()
        return native, "native"
    except RuntimeError:
        g = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

        def expanded():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, ke, ve, is_causal=causal, scale=scaling)

        expanded()
        torch.cuda.synchronize()
        return expanded, "expanded"


_FLEX = None


def flex_fn(q, k, v, scaling: float):
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    L = q.shape[2]
    # _compile=True: build the block mask without materialising an L x L mask (OOM at 128K).
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, L, L, device=q.device, _compile=True)
    return lambda: _FLEX(q, k, v, block_mask=bm, scale=scaling, enable_gqa=True)


# ---------------------------------------------------------------------------------------------
# decode cache from a plan
def decode_cache(k: torch.Tensor, v: torch.Tensor, plan, q_pos: torch.Tensor):
    """Packed ragged global part + dense tail, as the TCA cache holds it after prefill, seen by
    queries at q_pos (B, Q). -> (RaggedCacheView, bytes of K/V and positions it reads)."""
    from tca_attention.engine.plan import RaggedCacheView

    B, kv, L, d = k.shape
    ls = plan.local_start
    M = plan.kept_idx.shape[-1]
    valid = torch.arange(M, device=k.device) < plan.kept_len[..., None].long()  # (B, KV, M)
    idx = plan.kept_idx.clamp(max=L - 1)
    gidx = idx[..., None].expand(B, kv, M, d)
    g_keys = torch.gather(k, 2, gidx)[valid]  # (N, D), (b, h) major
    g_values = torch.gather(v, 2, gidx)[valid]
    g_pos = plan.kept_idx[valid]
    g_offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=k.device), plan.kept_len.flatten().long().cumsum(0)])
    t_keys, t_values = k[:, :, ls:].contiguous(), v[:, :, ls:].contiguous()  # (B, KV, T, D)
    t_pos = torch.arange(ls, L, device=k.device).expand(B, L - ls).contiguous()
    kv_bytes = 2 * (g_keys.numel() + t_keys.numel()) * k.element_size() + 8 * (g_pos.numel() + t_pos.numel())
    return RaggedCacheView(q_pos, g_keys, g_values, g_pos, g_offsets, t_keys, t_values, t_pos), kv_bytes


def graph_fn(fn):
    """Capture fn in a CUDA graph (decode: removes the Python launch gaps); -> replay callable."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


# ---------------------------------------------------------------------------------------------
def env_info() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0), "sms": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
        "shapes": {"batch": 1, "q_heads": H, "kv_heads": KV, "head_dim": D, "dtype": "bfloat16"},
        "prefill_config_env": os.environ.get("TCA_PREFILL_CONFIG"),
    }


def tflops(pairs: float, ms: float) -> float:
    return 4.0 * D * pairs / (ms * 1e-3) / 1e12


def sweep_prefill(q, k, v, plan, scaling, configs, results: dict) -> object:
    """Time each prefill config on one plan; check it agrees with the first; return the fastest."""
    from tca_attention.engine.triton_prefill import sparse_prefill_triton

    rows, best, ref = [], None, None
    for cfg in configs:
        try:
            out = sparse_prefill_triton(q, k, v, plan, scaling, config=cfg)
            torch.cuda.synchronize()
            if ref is None:
                ref = out.float()
            diff = float((out.float() - ref).abs().max())
            t = bench_ms(lambda: sparse_prefill_triton(q, k, v, plan, scaling, config=cfg), target_ms=200)
            row = {"config": asdict(cfg), "ms": t["median_ms"], "max_diff_vs_first": diff, "ok": diff < 5e-2}
            if row["ok"] and (best is None or t["median_ms"] < best[1]):
                best = (cfg, t["median_ms"])
        except Exception as e:  # a config may not compile on this device
            row = {"config": asdict(cfg), "error": repr(e)[:300]}
        log.info("sweep %s", row)
        rows.append(row)
    results["prefill_sweep"] = rows
    return best[0]


# The decode kernel's launch settings swept (ragged_decode_triton keywords; {} = the defaults: block_n 32,
# num_warps 4, num_stages 4, chunk for about 4 work items per SM: items_per_sm). Small caches (TCA at ~10% of 128K:
# ~70 MB a layer, ~30 us) are where tile size, pipelining depth and items per SM matter most.
DECODE_SETTINGS: list[dict] = [
    {}, {"block_n": 64, "num_stages": 3}, {"block_n": 64, "num_stages": 2}, {"block_n": 64, "num_stages": 4},
    {"num_warps": 8}, {"block_n": 64, "num_warps": 8, "num_stages": 3}, {"num_stages": 2}, {"num_stages": 3},
    {"use_tma": True}, {"block_n": 64, "num_stages": 3, "use_tma": True},
    {"chunk": 128}, {"chunk": 256}, {"chunk": 512}, {"chunk": 1024}, {"chunk": 2048},
    {"chunk": 512, "use_tma": True}, {"block_n": 64, "num_stages": 4, "chunk": 1024},
    {"block_n": 64, "num_stages": 3, "chunk": 512}, {"merge_block": 64},
    {"items_per_sm": 1}, {"items_per_sm": 2}, {"items_per_sm": 3}, {"items_per_sm": 8},
    {"items_per_sm": 2, "block_n": 64, "num_stages": 3}, {"items_per_sm": 1, "block_n": 64, "num_stages": 4},
    # around one wave: 4 programs of the default launch fit an H100 SM (96 registers, 55 KB of shared memory)
    {"items_per_sm": 5}, {"items_per_sm": 10},
    # the merge (5.4 us at 39% of 128K in Nsight Compute, kernels_ncu_decode.txt: 32 programs of one
    # (head, row) each; a 10%-kept call takes 36 us in all) cut over head-dim slices: 64 / 128 / 256 programs
    {"merge_split": 2}, {"merge_split": 4}, {"merge_split": 8},
    # programmatic dependent launch (sm_90+): each grid launches while the one before drains, so the
    # merge's launch and item-range prologue overlap the split grid's tail (the settings fail off Hopper)
    {"pdl": 1}, {"pdl": 1, "merge_split": 4},
]


def sweep_decode(q1, cache, scaling, settings, results: dict) -> dict:
    from tca_attention.engine.triton_decode import ragged_decode_triton

    rows, best, ref = [], None, None
    for kw in settings:
        try:
            fn = lambda: ragged_decode_triton(q1, cache, scaling, **kw)  # noqa: E731
            out = fn()[0]
            torch.cuda.synchronize()
            ref = out.float() if ref is None else ref
            diff = float((out.float() - ref).abs().max())
            t = bench_ms(graph_fn(fn), target_ms=100)
            row = {"kwargs": kw, "us": 1e3 * t["median_ms"], "max_diff_vs_first": diff}
            if diff < 5e-2 and (best is None or t["median_ms"] < best[1]):
                best = (kw, t["median_ms"])
        except Exception as e:
            row = {"kwargs": kw, "error": repr(e)[:300]}
        log.info("decode sweep %s", row)
        rows.append(row)
    results["decode_sweep"] = rows
    return best[0]


def run(args) -> dict:
    from tca_attention.engine.triton_decode import ragged_decode_triton
    from tca_attention.engine.triton_prefill import (
        PrefillConfig, config_text, default_config, prepare_prefill, sparse_prefill_triton,
    )

    t_start = time.time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "kernels_bench.json"
    res: dict = {"env": env_info(), "window": args.window, "block": args.block, "alpha": 0.5,
                 "command": "tca bench kernels " + " ".join(args.argv),
                 "prefill": [], "decode": []}
    log.info("env %s", res["env"])
    scaling = D**-0.5
    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")

    def save():
        res["elapsed_s"] = time.time() - t_start
        json_path.write_text(json.dumps(res, indent=1))

    def inputs(L):
        torch.manual_seed(L)
        q = torch.randn(1, H, L, D, device=dev, dtype=DTYPE)
        k = torch.randn(1, KV, L, D, device=dev, dtype=DTYPE)
        v = torch.randn(1, KV, L, D, device=dev, dtype=DTYPE)
        return q, k, v

    # 1) prefill tile sweep at one size
    cfg = default_config(D, dev)
    if args.sweep and not args.decode_only:
        L = args.sweep_len
        q, k, v = inputs(L)
        p = head_budgets(args.sweep_fraction, L, args.window, args.block, gen).to(dev)
        plan = tca_select(q, k, p, args.window, args.block, 0.5, scaling)
        configs = [cfg] + [c for c in [
            PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 64, 4, 3), PrefillConfig(128, 128, 8, 3), PrefillConfig(128, 64, 8, 4),
            PrefillConfig(128, 128, 8, 2), PrefillConfig(64, 64, 4, 3),
            PrefillConfig(128, 64, 8, 3, True), PrefillConfig(128, 128, 8, 3, True), PrefillConfig(128, 64, 4, 3, True),
            PrefillConfig(128, 128, 8, 2, True), PrefillConfig(128, 128, 8, 4, True), PrefillConfig(128, 64, 8, 4, True),
            PrefillConfig(256, 64, 8, 3, True), PrefillConfig(256, 64, 8, 2, True), PrefillConfig(256, 128, 8, 2, True),
            PrefillConfig(64, 128, 4, 3, True), PrefillConfig(64, 64, 4, 4, True),
        ] if c != cfg]
        cfg = sweep_prefill(q, k, v, plan, scaling, configs, res)
        res["prefill_config"] = asdict(cfg)
        res["prefill_config_text"] = config_text(cfg)  # the TCA_PREFILL_CONFIG form
        res["prefill_sweep_shape"] = {"L": L, "fraction": args.sweep_fraction,
                                      "pair_fraction": kept_pairs(plan, L) * (H // KV) / (H * L * (L + 1) / 2)}
        log.info("prefill config %s", cfg)
        del q, k, v, plan
    if args.sweep and args.decode_sweep_len > 0:
        # 2) decode settings sweep on a cache of decode_sweep_len tokens at decode_sweep_fraction kept
        L = args.decode_sweep_len
        q, k, v = inputs(L)
        p = head_budgets(args.decode_sweep_fraction, L, args.window, args.block, gen).to(dev)
        qpos = torch.full((1, 1), L - 1, dtype=torch.long, device=dev)
        cache, _ = decode_cache(k, v, tca_select(q, k, p, args.window, args.block, 0.5, scaling), qpos)
        q1 = q[:, :, -1:].contiguous()  # (1, H, 1, D)
        decode_kw = sweep_decode(q1, cache, scaling, DECODE_SETTINGS, res)
        res["decode_config"] = decode_kw
        res["decode_sweep_shape"] = {"L": L, "fraction": args.decode_sweep_fraction}
        del q, k, v, cache, q1
        torch.cuda.empty_cache()
        save()
    else:
        decode_kw = {}

    flex_spent = 0.0
    for L in args.contexts:
        if time.time() - t_start > args.time_budget:
            log.warning("time budget spent; stopping before L=%d", L)
            res["stopped_before"] = L
            break
        try:
            q, k, v = inputs(L)
        except torch.OutOfMemoryError:
            log.warning("L=%d does not fit", L)
            break
        dense_pairs = H * L * (L + 1) / 2
        entry: dict = {"L": L, "dense": {}, "tca": []}
        # dense
        for name in ("cudnn", "flash", "efficient", "flex") if not args.decode_only else ():
            if name == "efficient" and L > args.efficient_max:
                continue
            if name == "flex" and (L > args.flex_max or flex_spent > args.flex_budget):
                continue
            t0 = time.time()
            try:
                if name == "flex":
                    fn, gqa = flex_fn(q, k, v, scaling), "native"
                else:
                    fn, gqa = sdpa_fn(name, q, k, v, True, scaling)
                t = bench_ms(fn, target_ms=args.target_ms)
                entry["dense"][name] = {"ms": t["median_ms"], "tflops": tflops(dense_pairs, t["median_ms"]), "gqa": gqa}
            except Exception as e:
                entry["dense"][name] = {"error": repr(e)[:300]}
            if name == "flex":
                flex_spent += time.time() - t0
            log.info("L=%d dense %s %s", L, name, entry["dense"][name])
            torch.cuda.empty_cache()
        ok = {n: r for n, r in entry["dense"].items() if "ms" in r}
        best_name = min(ok, key=lambda n: ok[n]["ms"]) if ok else None
        entry["best_dense"] = best_name
        # TCA prefill
        plans = {}
        for frac in args.fractions:
            p = head_budgets(frac, L, args.window, args.block, gen).to(dev)
            selector = Selector(p, L, args.window, args.block, 0.5, "triton")
            sel = lambda: selector(q, k, scaling)  # noqa: E731
            plan = sel()
            plans[frac] = plan
            if args.decode_only:
                continue
            pairs = kept_pairs(plan, L) * (H // KV)
            attn = lambda: sparse_prefill_triton(q, k, v, plan, scaling, config=cfg)  # noqa: E731
            both = lambda: sparse_prefill_triton(q, k, v, sel(), scaling, config=cfg)  # noqa: E731
            t_sel = bench_ms(sel, target_ms=args.target_ms / 2)
            sel_ref = Selector(p, L, args.window, args.block, 0.5, "reference")
            t_sel_ref = bench_ms(lambda: sel_ref(q, k, scaling), target_ms=args.target_ms / 4)
            # the selection options on the fused path (TCA's last_q=16, gqa=union)
            t_opts = {f"select_{name}_ms": bench_ms(lambda s=Selector(p, L, args.window, args.block, 0.5, "triton", r, u):
                                                    s(q, k, scaling), target_ms=args.target_ms / 4)["median_ms"]
                      for name, r, u in (("last_q16", 16, False), ("union", 1, True), ("last_q16_union", 16, True))}
            t_att = bench_ms(attn, target_ms=args.target_ms)
            t_all = bench_ms(both, target_ms=args.target_ms)
            t_prep = bench_ms(lambda: prepare_prefill(k, v, plan, cfg.block_m // (H // KV)), target_ms=50)
            kf = float(plan.kept_fraction(L).mean())
            row = {
                "target_fraction": frac, "kept_fraction": kf,
                "kept_fraction_per_head": [round(x, 4) for x in plan.kept_fraction(L).flatten().tolist()],
                "pair_fraction": pairs / dense_pairs,
                "select_ms": t_sel["median_ms"], "select_reference_ms": t_sel_ref["median_ms"], **t_opts,
                "attn_ms": t_att["median_ms"], "total_ms": t_all["median_ms"],
                "gather_and_bounds_ms": t_prep["median_ms"],
                "select_share": t_sel["median_ms"] / t_all["median_ms"],
                "attn_tflops": tflops(pairs, t_att["median_ms"]),
            }
            if best_name:
                row["speedup_vs_best_dense"] = ok[best_name]["ms"] / t_all["median_ms"]
                row["efficiency_vs_best_dense"] = row["attn_tflops"] / ok[best_name]["tflops"]
            if "flash" in ok:
                row["speedup_vs_flash"] = ok["flash"]["ms"] / t_all["median_ms"]
            if L in (8192, 131072) and abs(frac - 0.39) < 1e-9:
                key = f"selection_breakdown_{L // 1024}k_ms"
                res[key] = selection_breakdown(q, k, p, args.window, args.block, 0.5, scaling)
                log.info("selection breakdown %s %s", key, res[key])
            entry["tca"].append(row)
            log.info("L=%d TCA %s", L, {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items() if k_ != "kept_fraction_per_head"})
        if not args.decode_only:
            res["prefill"].append(entry)
        save()

        # decode: one query over the cache
        q1 = q[:, :, -1:].contiguous()  # (1, H, 1, D)
        qpos = torch.full((1, 1), L - 1, dtype=torch.long, device=dev)
        dentry: dict = {"L": L, "dense": {}, "tca": [],
                        "dense_kv_bytes": 2 * k.numel() * k.element_size()}
        for name in ("flash", "cudnn", "efficient"):
            try:
                fn, gqa = sdpa_fn(name, q1, k, v, False, scaling)
                gfn = graph_fn(fn)
                t = bench_ms(gfn, target_ms=100)
                t_r = bench_ms(gfn, target_ms=100, flush="read")
                dentry["dense"][name] = {"us": 1e3 * t["median_ms"], "us_read_flush": 1e3 * t_r["median_ms"], "gqa": gqa,
                                         "gbps": dentry["dense_kv_bytes"] / (t["median_ms"] * 1e-3) / 1e9}
            except Exception as e:
                dentry["dense"][name] = {"error": repr(e)[:300]}
            log.info("L=%d decode dense %s %s", L, name, dentry["dense"][name])
        dok = {n: r for n, r in dentry["dense"].items() if "us" in r and r["gqa"] == "native"}
        for frac in args.fractions:
            cache, kv_bytes = decode_cache(k, v, plans[frac], qpos)
            fn = lambda: ragged_decode_triton(q1, cache, scaling, **decode_kw)  # noqa: E731
            t_eager = bench_ms(fn, target_ms=100)
            gfn = graph_fn(fn)
            t = bench_ms(gfn, target_ms=100)
            t_r = bench_ms(gfn, target_ms=100, flush="read")
            row = {"target_fraction": frac, "kept_fraction": float(plans[frac].kept_fraction(L).mean()),
                   "us": 1e3 * t["median_ms"], "us_read_flush": 1e3 * t_r["median_ms"],
                   "us_eager": 1e3 * t_eager["median_ms"], "kv_bytes": kv_bytes,
                   "gbps": kv_bytes / (t["median_ms"] * 1e-3) / 1e9}
            if "flash" in dok:
                row["speedup_vs_flash"] = dok["flash"]["us"] / row["us"]
                row["speedup_vs_flash_read_flush"] = dok["flash"]["us_read_flush"] / row["us_read_flush"]
            if dok:
                row["speedup_vs_best_dense"] = min(r["us"] for r in dok.values()) / row["us"]
            dentry["tca"].append(row)
            log.info("L=%d decode TCA %s", L, row)
        res["decode"].append(dentry)
        save()
        del q, k, v, plans, q1
        torch.cuda.empty_cache()
    save()
    return res


# ---------------------------------------------------------------------------------------------
def plot(res: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dev = res["env"]["device"]
    pre = res["prefill"]
    if pre:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
        Ls = [e["L"] for e in pre]
        for name in ("cudnn", "flash", "efficient", "flex"):
            pts = [(e["L"], e["dense"][name]["ms"]) for e in pre if "ms" in e["dense"].get(name, {})]
            if pts:
                a1.plot(*zip(*pts), "--o", label=f"dense {name}")
        fracs = [r["target_fraction"] for r in pre[-1]["tca"]]
        for i, f in enumerate(fracs):
            pts = [(e["L"], e["tca"][i]["total_ms"]) for e in pre if len(e["tca"]) > i]
            a1.plot(*zip(*pts), "-s", label=f"TCA {int(round(f * 100))}% (select+attn)")
            sp = [(e["L"], e["tca"][i].get("speedup_vs_best_dense", math.nan)) for e in pre if len(e["tca"]) > i]
            a2.plot(*zip(*sp), "-s", label=f"TCA {int(round(f * 100))}% vs best dense")
        i39 = min(range(len(fracs)), key=lambda i: abs(fracs[i] - 0.39)) if fracs else None
        if i39 is not None:
            sp = [(e["L"], e["tca"][i39].get("speedup_vs_flash", math.nan)) for e in pre if len(e["tca"]) > i39]
            a2.plot(*zip(*sp), ":^", color="k", label=f"TCA {int(round(fracs[i39] * 100))}% vs flash")
        a1.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per layer", title=f"Prefill, one layer ({dev})")
        a2.axhline(1.0, color="grey", lw=0.8)
        a2.set(xscale="log", xlabel="context (tokens)", ylabel="speedup", title="TCA speedup (selection included)")
        for a in (a1, a2):
            a.set_xticks(Ls, [f"{L // 1024}K" for L in Ls])
            a.legend(fontsize=8)
            a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "kernels_prefill.png", dpi=110)
        plt.close(fig)
    dec = res["decode"]
    if dec:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
        Ls = [e["L"] for e in dec]
        for name in ("flash", "cudnn", "efficient"):
            pts = [(e["L"], e["dense"][name]["us"]) for e in dec if "us" in e["dense"].get(name, {})]
            if pts:
                a1.plot(*zip(*pts), "--o", label=f"dense {name}")
        fracs = [r["target_fraction"] for r in dec[-1]["tca"]]
        for i, f in enumerate(fracs):
            pts = [(e["L"], e["tca"][i]["us"]) for e in dec if len(e["tca"]) > i]
            a1.plot(*zip(*pts), "-s", label=f"TCA {int(round(f * 100))}%")
            sp = [(e["L"], e["tca"][i].get("speedup_vs_flash", math.nan)) for e in dec if len(e["tca"]) > i]
            a2.plot(*zip(*sp), "-s", label=f"TCA {int(round(f * 100))}% vs dense flash")
        a1.set(xscale="log", yscale="log", xlabel="cache length (tokens)", ylabel="us per layer (CUDA graph)", title=f"Decode, one query, one layer ({dev})")
        a2.axhline(1.0, color="grey", lw=0.8)
        a2.set(xscale="log", xlabel="cache length (tokens)", ylabel="speedup", title="TCA decode speedup")
        for a in (a1, a2):
            a.set_xticks(Ls, [f"{L // 1024}K" for L in Ls])
            a.legend(fontsize=8)
            a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "kernels_decode.png", dpi=110)
        plt.close(fig)


def summary(res: dict) -> str:
    lines = [f"device {res['env']['device']}  torch {res['env']['torch']}  triton {res['env']['triton']}"]
    if "prefill_config" in res:
        lines.append(f"prefill config {res['prefill_config']}  decode config {res.get('decode_config')}")
    for e in res["prefill"]:
        dense = "  ".join(f"{n} {r['ms']:.2f}" for n, r in e["dense"].items() if "ms" in r)
        lines.append(f"prefill L={e['L']}: dense ms {dense}")
        for r in e["tca"]:
            lines.append(
                f"   TCA {r['kept_fraction']:.3f} kept: select {r['select_ms']:.2f} attn {r['attn_ms']:.2f} total {r['total_ms']:.2f} ms"
                f"  {r['attn_tflops']:.0f} TFLOP/s  x{r.get('speedup_vs_best_dense', math.nan):.2f} best"
                f"  x{r.get('speedup_vs_flash', math.nan):.2f} flash  eff {r.get('efficiency_vs_best_dense', math.nan):.2f}"
                f"  sel {100 * r['select_share']:.1f}%")
    for e in res["decode"]:
        dense = "  ".join(f"{n} {r['us']:.1f} ({r.get('us_read_flush', math.nan):.1f})" for n, r in e["dense"].items() if "us" in r)
        lines.append(f"decode L={e['L']}: dense us (read-flush) {dense}")
        for r in e["tca"]:
            lines.append(f"   TCA {r['kept_fraction']:.3f}: {r['us']:.1f} us (read-flush {r.get('us_read_flush', math.nan):.1f},"
                         f" eager {r['us_eager']:.1f})  {r['gbps']:.0f} GB/s  x{r.get('speedup_vs_flash', math.nan):.2f} flash"
                         f" (read-flush x{r.get('speedup_vs_flash_read_flush', math.nan):.2f})  KV {r['kv_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "results/kernels"),
                    help="folder of kernels_bench.json and the PNG plots (the OUT environment variable sets the default)")
    ap.add_argument("--contexts", default="8192,16384,32768,65536,131072,262144",
                    help="comma list of context lengths in tokens")
    ap.add_argument("--fractions", default="0.10,0.25,0.39,0.60", help="comma list of TCA kept fractions")
    ap.add_argument("--window", type=int, default=4096, help="TCA local window w in tokens")
    ap.add_argument("--block", type=int, default=128, help="TCA block size b in tokens")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false",
                    help="skip the kernel launch-config sweeps (use the default configs)")
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill timings (plans are still built)")
    ap.add_argument("--sweep-len", type=int, default=32768, help="context length of the prefill config sweep")
    ap.add_argument("--sweep-fraction", type=float, default=0.39, help="TCA kept fraction of the prefill config sweep's plan")
    ap.add_argument("--decode-sweep-len", type=int, default=131072,
                    help="context length of the decode config sweep (0: no decode sweep)")
    ap.add_argument("--decode-sweep-fraction", type=float, default=0.39,
                    help="TCA kept fraction of the decode config sweep's cache (the 8B decode step keeps ~0.10 at 128K)")
    ap.add_argument("--target-ms", type=float, default=300.0, help="timed milliseconds per measurement")
    ap.add_argument("--efficient-max", type=int, default=131072,
                    help="longest context timed with the memory-efficient SDPA backend")
    ap.add_argument("--flex-max", type=int, default=131072, help="longest context timed with FlexAttention")
    ap.add_argument("--flex-budget", type=float, default=150.0, help="seconds of FlexAttention compile+timing")
    ap.add_argument("--time-budget", type=float, default=420.0, help="no new context starts after this many seconds")
    ap.add_argument("--plot-only", default=None,
                    help="a kernels_bench.json to plot again (no GPU needed); default: run the benchmark")
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    args.argv = argv
    if not args.plot_only and (rc := require_cuda("tca bench kernels")) is not None:
        return rc
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        res = json.loads(Path(args.plot_only).read_text())
    else:
        args.contexts = [int(x) for x in args.contexts.split(",")]
        args.fractions = [float(x) for x in args.fractions.split(",")]
        res = run(args)
    plot(res, out_dir)
    print(summary(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
