"""Where a method's prefill pays off on this GPU and *this model*: measured once through the whole
model, then cached.

The per-layer crossover (methods/tca/crossover.py) times one attention layer's kernels. On a small
model the prefill also pays the session's per-layer host work (planning, the adapter, the cache
commit), which one layer's kernels do not show: Qwen2.5-Coder-0.5B at 8K tokens, batch 1, H100,
prefilled in 39 ms with TCA vs 32 ms dense although the layer crossover said TCA wins from 8K
(`docs/results/gpu_2026-12-06b/`). Here the model's own prefill forward (`logits_to_keep=1`, one
row of random tokens, a fresh cache) is timed at a ladder of lengths, plain attention vs the method
with its short-prompt policy off, and the crossover is the shortest length from which the method is
at least as fast at every longer length measured. A method asks for it (`Method.
model_crossover_pending`, TCA's `dense_below="auto"` on CUDA) and the session measures it when it is
enabled, before it patches the model. Cached as JSON per (device, versions, model identity, dtype,
method settings) under paths.cache_root()/crossover/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..introspect import layer_kinds, text_config
from ..methods.base import Method
from ..methods.state import ModelIdentity
from ..methods.tca.crossover import LENGTHS, crossover_of
from ..paths import cache_root

log = logging.getLogger(__name__)
Timer = Callable[[Callable[[], object]], float]
_MEASURING: set[int] = set()  # models being measured (a method whose measuring copy asks again would recurse)


def _default_timer(fn: Callable[[], object]) -> float:
    from ..engine.timing import bench_ms

    return bench_ms(fn, target_ms=80.0, max_reps=10, flush="none")["median_ms"]


def ladder(model: nn.Module, lengths: tuple[int, ...] = LENGTHS) -> tuple[int, ...]:
    """The lengths the model can take (its trained context bounds the ladder)."""
    limit = getattr(text_config(model), "max_position_embeddings", None) or max(lengths)
    return tuple(L for L in lengths if L <= limit)


@torch.no_grad()
def measure_model(model: nn.Module, method: Method, lengths: tuple[int, ...] | None = None,
                  timer: Timer | None = None, sliding_kernel: bool = True) -> list[dict[str, float]]:
    """{"length", "dense_ms", "tca_ms"} per length: the model's prefill forward with plain attention
    and with `method` (its policy field `dense_below` set to 0), both with the session's choice for
    sliding-window layers (`enable(sliding_kernel=...)`: the windowed kernel would otherwise be
    counted as the method's gain). A length that runs out of memory ends the ladder (the longer
    ones are not measured)."""
    from .hf import enable

    if id(model) in _MEASURING:
        raise RuntimeError(f"{method.name}: its measuring copy (dense_below=0) asked for a model crossover again")
    timer = timer or _default_timer
    sparse_method = dataclasses.replace(method, dense_below=0)
    windowed = sliding_kernel and "sliding" in layer_kinds(model)  # plain attention with the windowed kernel
    device = next(model.parameters()).device
    vocab = text_config(model).vocab_size
    rows = []
    _MEASURING.add(id(model))
    try:
        for L in lengths or ladder(model):
            ids = torch.randint(0, vocab, (1, L), device=device)
            try:
                with enable(model, None) if windowed else contextlib.nullcontext():
                    dense_ms = timer(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
                with enable(model, sparse_method, sliding_kernel=sliding_kernel) as session:
                    tca_ms = timer(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                                 **session.cache_kwargs(session.new_cache())))
            except torch.OutOfMemoryError:
                log.warning("model crossover: out of memory at %d tokens; longer prompts not measured", L)
                torch.cuda.empty_cache()
                break
            rows.append({"length": L, "dense_ms": dense_ms, "tca_ms": tca_ms})
    finally:
        _MEASURING.discard(id(model))
    return rows


def cache_path(model: nn.Module, method: Method, sliding_kernel: bool = True) -> Path:
    """The cache file of this (device, versions, model, dtype, method settings, sliding-window path)."""
    import transformers

    param = next(model.parameters())
    key = {
        "device": torch.cuda.get_device_name(param.device) if param.is_cuda else str(param.device),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": dataclasses.asdict(ModelIdentity.of(model)), "dtype": str(param.dtype),
        "method": repr(dataclasses.replace(method, dense_below=0)),
    }
    if sliding_kernel and "sliding" in layer_kinds(model):  # the windowed kernel in both timings
        key["sliding_kernel"] = True
    try:
        import triton

        key["triton"] = triton.__version__
    except ImportError:
        pass
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / "crossover" / f"model-{digest}.json"


def model_crossover(model: nn.Module, method: Method, timer: Timer | None = None,
                    sliding_kernel: bool = True) -> int:
    """The cached model-level crossover of `method` on `model`, measuring it once when missing
    (sliding_kernel: the session's choice for sliding-window layers, in both timings)."""
    path = cache_path(model, method, sliding_kernel)
    if path.exists():
        return int(json.loads(path.read_text())["crossover"])
    lengths = ladder(model)
    print(f"Measuring once where {method.name}'s prefill pays off on this model (whole-model prefill, dense vs "
          f"{method.name}, {len(lengths)} lengths up to {max(lengths)}); cached in {path}", file=sys.stderr, flush=True)
    rows = measure_model(model, method, lengths, timer, sliding_kernel)
    value = crossover_of(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"crossover": value, "rows": rows}, indent=1))
    tmp.replace(path)
    log.info("model crossover of %s: %s (%s)", method.name, value, rows)
    return value
