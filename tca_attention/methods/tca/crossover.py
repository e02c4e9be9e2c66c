"""Where TCA's prefill pays off on this GPU and model shape: measured once, then cached.

One prefill layer is timed at a ladder of prompt lengths with random inputs of the model's head
shape: dense SDPA (causal, GQA) against TCA's whole layer path (selection, sparse prefill, and the
ragged cache's commit). The crossover is the shortest length from which TCA is at least as fast at
every longer length measured; shorter prompts then stay dense (`TCA(dense_below="auto")`), so TCA
is never slower than doing nothing where it cannot win. The CPU path (the PyTorch reference) is a
correctness path, not a speed path: there "auto" means never dense. Cached as JSON per (device,
torch/triton versions, head shape, dtype, budgets) under paths.cache_root()/crossover/.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import torch

from ...engine import dispatch
from ...paths import cache_root

log = logging.getLogger(__name__)
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
NEVER = 1 << 40  # no measured length paid off: every prompt stays dense


def crossover_of(rows: list[dict[str, float]]) -> int:
    """The shortest length from which TCA is at least as fast at every longer length; NEVER if none.

    rows: {"length", "dense_ms", "tca_ms"} sorted by length."""
    best = NEVER
    for row in reversed(rows):
        if row["tca_ms"] > row["dense_ms"]:
            break
        best = int(row["length"])
    return best


def _layer_to_time(method) -> int:
    """The full layer with the median kept fraction (layers that keep everything are never sparse)."""
    fracs = method.budgets.head_fractions()
    layers = [(sum(f) / len(f), i) for i, f in enumerate(fracs) if f is not None and not method._all_dense(i)]
    if not layers:
        raise ValueError("every layer of these budgets is dense: there is no sparse prefill to time")
    return sorted(layers)[len(layers) // 2][1]


def measure(method, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
            lengths: tuple[int, ...] = LENGTHS, timer: Callable[[Callable[[], object]], float] | None = None,
            ) -> list[dict[str, float]]:
    """Time one layer, dense vs TCA, at each length. timer(fn) -> ms (default: engine.timing)."""
    from ...ragged_cache import RaggedLayer

    if timer is None:
        from ...engine.timing import bench_ms

        def timer(fn: Callable[[], object]) -> float:
            return bench_ms(fn, target_ms=60.0, max_reps=20)["median_ms"]

    tca = dataclasses.replace(method, dense_below=0)
    idx = _layer_to_time(tca)
    kv_heads = len(tca.budgets.layers[idx])  # the heads it runs (a tensor-parallel rank: its own)
    scaling = head_dim**-0.5
    rows = []
    for L in lengths:
        q = torch.randn(1, heads, L, head_dim, device=device, dtype=dtype)
        k, v = torch.randn(2, 1, kv_heads, L, head_dim, device=device, dtype=dtype).unbind(0)
        key_start = torch.zeros(1, dtype=torch.long, device=device)

        def dense() -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                                    enable_gqa=True)

        def sparse() -> object:
            plan = tca.plan(idx, q, k, key_start, scaling, padded=False)
            if plan is None:
                return dense()
            out = dispatch.prefill(q, k, v, plan, scaling)
            layer = RaggedLayer(tca.block_size, tca.window)
            layer.update(k, v)
            layer.commit_prefill(plan, key_start, plan.decode_keep)
            return out

        rows.append({"length": L, "dense_ms": timer(dense), "tca_ms": timer(sparse)})
        del q, k, v
    return rows


def _path(method, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> Path:
    import triton  # the GPU path needs it

    key = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
        "heads": heads, "kv_heads": len(next(r for r in method.budgets.layers if r is not None)), "head_dim": head_dim, "dtype": str(dtype),
        "budgets": hashlib.sha256(json.dumps(method.budgets.to_json(), sort_keys=True).encode()).hexdigest()[:16],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "crossover" / f"{digest}.json"


def crossover(method, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> int:
    """The cached crossover for this device and shape, measuring it (once, ~10 s) when missing.
    0 on the CPU (no policy: the reference path is not a speed path)."""
    if device.type != "cuda" or not dispatch.triton_available():
        return 0
    path = _path(method, heads, head_dim, dtype, device)
    if path.exists():
        return int(json.loads(path.read_text())["crossover"])
    print(f"Measuring once where TCA's prefill pays off on {torch.cuda.get_device_name(device)} "
          f"(dense vs TCA, one layer, {len(LENGTHS)} lengths); cached in {path}", file=sys.stderr, flush=True)
    rows = measure(method, heads, head_dim, dtype, device)
    value = crossover_of(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"crossover": value, "rows": rows}, indent=1))
    tmp.replace(path)
    log.info("TCA crossover on %s: %s (%s)", torch.cuda.get_device_name(device), value, rows)
    return value
