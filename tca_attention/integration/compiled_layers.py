"""Decode steps with every decoder layer compiled by torch.compile (inductor), attention and the
cache left eager.

A batch-1 decode step of a large model on a fast GPU spends milliseconds in small kernels around
the weights and the attention: RMSNorm's casts and reductions, rotary's rotate-half and
concatenations, SiLU times up, residual adds (`benchmarks/profile_step.py`). Compiling each
decoder layer fuses them into a few kernels. The attention function and the cache's `update`
run behind `torch.compiler.disable` (a graph break), so the cache's host counters never become
guards and the method's kernels run as they do eagerly; the compiled parts are plain tensor code
of fixed shapes, which a CUDA graph then captures like any other kernel.

`compiled_decoder_layers(model, cache)` swaps each layer of the model's ModuleList for its
compiled wrapper (the same module inside: parameters, hooks and state are shared), registers a
disabled wrapper of the model's attention function and wraps the cache's `update`; leaving the
context puts every one of them back. With prefill=True a multi-token forward (the prompt) runs
the layer compiled a second time with dynamic shapes (one graph for every prompt length and
batch), one-token forwards the static decode entry: at 128K a quarter of a prefill's kernel time
is the elementwise code around attention and weights (`benchmarks/profile_step.py`). Dynamo's
recompile limit is raised inside it so that a model's layers never run past it back into eager
code. The first decode steps pay the compilation
(in StaticRun.decode_s, not in its steady steps); later runs in the same process reuse it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..introspect import decoder_layers
from . import adapter


def _dynamo_settings(n_layers: int) -> dict[str, Any]:
    """Config patch: room for one compiled entry per layer and cache type. The layer's forward
    hands its layer_idx to the (disabled) cache update, which specialises the entry on it: a
    model compiles its layer code once per layer (inductor's FX graph cache may serve the
    repeats); with the default limit (8) the later layers would silently run eagerly."""
    import torch._dynamo.config as cfg

    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return {limit: max(getattr(cfg, limit), 4 * n_layers + 8)}


# inductor's tuning for the decode steps (gpt-fast's settings): GEMM autotuning picks faster kernels
# for the weight GEMVs every step reads, coordinate descent tunes the fused kernels' launch
# parameters. Compiles take longer (minutes on an 8B model); measured on an H100 at 128K, 8B shape:
# TCA's compiled graph step 7.54 -> 6.75 ms, keep-all's 12.6 -> 11.7 ms (docs/results/gpu_2026-12-07g/).
TUNED_OPTIONS = {"max_autotune_gemm": True, "coordinate_descent_tuning": True}


def _compile(layer: nn.Module, dynamic: bool, tuned: bool) -> Callable[..., Any]:
    return torch.compile(layer, dynamic=dynamic, options=dict(TUNED_OPTIONS) if tuned else None)


class PhaseCompiledLayer(nn.Module):
    """A decoder layer compiled twice: one-token forwards (decode) with static shapes, longer ones
    (prefill) with dynamic shapes. Attributes the model reads from its layers (e.g. attention_type)
    come from the original layer."""

    def __init__(self, layer: nn.Module, tuned: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self._decode = _compile(layer, False, tuned)
        self._prefill = _compile(layer, True, tuned)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        fn = self._decode if hidden_states.shape[1] == 1 else self._prefill
        return fn(hidden_states, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


@contextmanager
def compiled_decoder_layers(model: nn.Module, cache: Any, prefill: bool = False, tuned: bool = False
                            ) -> Iterator[None]:
    """Within: the model's decoder layers compiled (torch.compile, dynamic=False; with prefill,
    multi-token forwards through a second, dynamic-shape compilation; tuned: with TUNED_OPTIONS),
    its attention function and `cache.update` eager behind torch.compiler.disable. Everything is
    put back on exit."""
    import torch._dynamo

    layers = decoder_layers(model)
    originals = list(layers)
    restore_attention = adapter.swap_attention_function(adapter.attention_implementation(model),
                                                        torch.compiler.disable)
    had_update = "update" in vars(cache)
    cache.update = torch.compiler.disable(cache.update)
    try:
        with torch._dynamo.config.patch(**_dynamo_settings(len(originals) * (2 if prefill else 1))):
            for i, layer in enumerate(originals):
                layers[i] = PhaseCompiledLayer(layer, tuned) if prefill else _compile(layer, False, tuned)
            yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        if not had_update:
            del cache.update
        restore_attention()
