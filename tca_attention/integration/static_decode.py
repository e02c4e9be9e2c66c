"""Greedy decoding with static-shape decode steps, captured in CUDA graphs and replayed.

The prompt is prefilled eagerly into a static cache (a StaticRaggedCache for a method, transformers'
StaticCache for plain attention: the same runner, so comparisons are fair). One decode step of the
whole model (input token, positions, 4D masks, every layer's cache write and attention) reads and
writes only buffers of fixed address and shape, and device counters: on a GPU it is captured in a
torch.cuda.CUDAGraph after eager warm-up steps on a side stream, then replayed once per token,
the next token copied into the input buffer inside the graph. Greedy only, exactly max_new_tokens
tokens (no stop at EOS: the tokens stay on the device until the end; truncate afterwards).

Two graphs at most: one step with the ragged layers' masked compression pass and one without,
replayed by a host schedule computed after prefill (StaticRaggedCache.compress_steps): a step at
which no row of any layer can compress skips that work. The first step runs eagerly (its
catch-up compression of a long dense prompt tail may take several passes), and one warm-up step
on a side stream before a capture. Without CUDA (or cuda_graph=False) the very same
steps run eagerly, following the same schedule: that is what the CPU tests check.

compile_layers=True: the decode steps run with every decoder layer compiled by torch.compile
(integration/compiled_layers.py: norms, rotary, MLP and residual adds fused; attention and the
cache eager), compiled during the eager steps, before any capture; the prefill stays eager unless
compile_prefill=True too (a second, dynamic-shape compilation: the first prompt pays it, later
prompts of any length reuse it).
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..introspect import layer_kinds
from ..static_cache import StaticRaggedCache
from . import adapter
from .compiled_layers import compiled_decoder_layers


@dataclass(frozen=True)
class StaticRun:
    """What greedy_static produced and how long it took (wall clock, synchronised)."""

    sequences: torch.Tensor  # (B, L + max_new_tokens): the prompt then the new tokens
    cache: Any
    prefill_s: float
    decode_s: float  # every decode step, warm-up and capture included
    steady_s: float  # the steps after warm-up and capture (graph replays, or eager steps)
    steady_steps: int
    eager_steps: int
    graphs: int  # CUDA graphs captured (0: eager)
    compiled_layers: bool = False  # decode steps ran with the decoder layers compiled
    compiled_prefill: bool = False  # and the prompt's forward (prefill_s includes a first compilation)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Steady-state decode speed: tokens per second of batch row (None: no steady step)."""
        return self.steady_steps / self.steady_s if self.steady_steps and self.steady_s > 0 else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StaticStep:
    """One decode step of the whole model over static buffers; call it eagerly or capture it."""

    def __init__(self, model: nn.Module, cache: Any, first: torch.Tensor, key_start: torch.Tensor,
                 next_pos_ids: torch.Tensor, prompt_len: int, tokens: torch.Tensor) -> None:
        self.model, self.cache, self.tokens = model, cache, tokens
        self.kinds = layer_kinds(model)
        dev = first.device
        self.key_start = key_start
        self.ids = first.view(-1, 1).clone()  # (B, 1) the token fed next
        self.pos = torch.full((1,), prompt_len, dtype=torch.long, device=dev)  # its cache index
        self.pos_ids = next_pos_ids.clone()  # (B, 1) its rotary position (padding not counted)
        self.col = torch.ones(1, dtype=torch.long, device=dev)  # column of tokens written next

    def __call__(self) -> None:
        mask = adapter.static_decode_mask(self.kinds, self.cache, self.key_start, self.pos)
        out = self.model(input_ids=self.ids, attention_mask=mask, position_ids=self.pos_ids, use_cache=True,
                         **adapter.cache_kwargs(self.cache))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        self.tokens.index_copy_(1, self.col, nxt)
        self.ids.copy_(nxt)
        self.pos.add_(1)
        self.pos_ids.add_(1)
        self.col.add_(1)


def _new_cache(model: nn.Module, session, prompt_len: int, max_new_tokens: int) -> Any:
    if session is None or session.method.is_dense:
        return adapter.static_dense_cache(model, prompt_len + max_new_tokens)
    return session.new_cache(max_new_tokens=max_new_tokens)


@torch.no_grad()
def greedy_static(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  max_new_tokens: int, session=None, cuda_graph: bool = True,
                  compile_layers: bool = False, compile_prefill: bool = False, compile_tuning: bool = False,
                  steady_context: AbstractContextManager | None = None) -> StaticRun:
    """Greedy decoding of max_new_tokens tokens with static decode steps (CUDA graphs on a GPU
    when cuda_graph). session: an enabled Session (its method's static ragged cache), or None for
    plain attention over transformers' StaticCache. attention_mask: left padding only.
    compile_layers: decode steps with the decoder layers compiled (torch.compile); with
    compile_prefill the prompt's forward too; compile_tuning: with inductor's GEMM autotuning and
    coordinate-descent tuning (compiled_layers.TUNED_OPTIONS; longer compiles). steady_context:
    entered around the steady steps only (the graph replays, or the eager steps after the first),
    e.g. a torch.profiler.profile that should see a decode step's kernels and nothing of the
    prefill or the capture."""
    if compile_prefill and not compile_layers:
        raise ValueError("compile_prefill=True needs compile_layers=True")
    if compile_tuning and not compile_layers:
        raise ValueError("compile_tuning=True needs compile_layers=True")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got {tuple(input_ids.shape)}")
    dev = input_ids.device
    B, L = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev).long()
    key_start = (mask.cumsum(-1) == 0).sum(-1)  # (B,) leading padding
    pos_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = _new_cache(model, session, L, max_new_tokens)
    steps = max_new_tokens - 1  # decode forwards: the last token is never fed

    with ExitStack() as compiled:
        if compile_prefill:
            compiled.enter_context(compiled_decoder_layers(model, cache, prefill=True, tuned=compile_tuning))
        _sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos_ids, use_cache=True,
                    logits_to_keep=1, **adapter.cache_kwargs(cache))
        tokens = torch.empty(B, max_new_tokens, dtype=torch.long, device=dev)
        tokens[:, :1] = out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        _sync(dev)
        t1 = time.perf_counter()

        ragged = isinstance(cache, StaticRaggedCache)
        need = cache.compress_steps(steps) if ragged else [False] * steps  # host schedule, one read
        step = StaticStep(model, cache, tokens[:, 0], key_start, pos_ids[:, -1:] + 1, L, tokens)
        capture = cuda_graph and dev.type == "cuda"
        if compile_layers and not compile_prefill:
            compiled.enter_context(compiled_decoder_layers(model, cache, tuned=compile_tuning))
        t2, t3, eager, rest, graphs = _decode(step, cache, ragged, need, steps, capture, dev,
                                               steady_context or nullcontext())
    _set_pass(cache, ragged, True)
    _resync(cache, ragged)
    return StaticRun(torch.cat([input_ids, tokens], 1), cache, t1 - t0, t3 - t1, t3 - t2, len(rest), eager,
                     len(graphs), compile_layers, compile_prefill)


def _decode(step: StaticStep, cache: Any, ragged: bool, need: list[bool], steps: int, capture: bool,
            dev: torch.device, steady: AbstractContextManager) -> tuple[float, float, int, list[bool], dict]:
    """The decode steps: eager ones, then captured graphs replayed (or eager steps) by the
    schedule `need`. -> (time before the steady steps, time after them, eager steps, the steady
    steps' schedule, the graphs)."""
    # eager: the first step (its catch-up compression), and one warm-up step before a capture
    eager = min(steps, 2 if capture else 1)
    stream = torch.cuda.Stream(dev) if capture else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        for s in range(eager):
            _set_pass(cache, ragged, need[s])
            step()
    if stream is not None:
        torch.cuda.current_stream(dev).wait_stream(stream)
    graphs: dict[bool, torch.cuda.CUDAGraph] = {}
    rest = need[eager:]
    if capture and rest:
        for variant in sorted(set(rest)):
            _set_pass(cache, ragged, variant)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()  # recorded, not run: the host counters it moved are put back below
            graphs[variant] = g
        _resync(cache, ragged)
    _sync(dev)
    with steady:
        t2 = time.perf_counter()
        for variant in rest:
            if graphs:
                graphs[variant].replay()
            else:
                _set_pass(cache, ragged, variant)
                step()
        _sync(dev)
        t3 = time.perf_counter()
    return t2, t3, eager, rest, graphs


def _set_pass(cache: Any, ragged: bool, on: bool) -> None:
    if ragged:
        cache.set_compress_pass(on)


def _resync(cache: Any, ragged: bool) -> None:
    if ragged:
        cache.sync_host()
