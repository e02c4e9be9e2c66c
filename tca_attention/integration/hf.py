"""Plug a method into a transformers model: attention registration, the cache, hooks, checks.

Only public extension points are used, through `adapter` (the one module that knows how a
transformers release calls attention): the attention and mask interfaces,
`model.set_attn_implementation`, the `Cache` classes, and removable forward hooks. The
pre-hooks on attention modules tell the attention function which cache the call uses; the hooks
on the model check after every forward that each ragged layer given new keys by transformers
also planned (prefill) or attended over its cache (decode), and raise otherwise: a missed cache
must never turn into a silently wrong answer. Everything is undone by `Session.disable()`.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn

from ..ragged_cache import RaggedCache, RaggedLayer
from ..static_cache import StaticRaggedCache
from ..engine import certificate, dispatch
from ..engine.plan import TokenPlan, sliding_window_plan
from ..methods.base import Method, Observer, Override
from ..methods.dense import Dense
from . import adapter, tensor_parallel
from ..introspect import attention_modules, layer_kinds, text_config
from .architectures import check_supported

ATTN_NAME = "tca"
_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, Session]" = weakref.WeakKeyDictionary()
_NOT_SEEN = object()


class CacheNotUsedError(RuntimeError):
    """transformers stored keys in a ragged cache, but attention did not run over it."""


def tca_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function: routes each call to the session owning the module."""
    session = _SESSIONS.get(module)
    if session is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_NAME!r} is set but no tca_attention session owns this model; "
            "use `with tca_attention.enable(model, method):`"
        )
    call = adapter.parse_attention_call(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    return session.attend(call)


def key_start_from_mask(mask: torch.Tensor | None, batch: int, seq_len: int, device) -> torch.Tensor:
    """(B,) count of leading padding keys, read off the last query's row of a prefill mask."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    row = mask[:, 0, -1, -seq_len:] if mask.dim() == 4 else mask[:, -seq_len:]
    return _leading_padding(row, batch, seq_len, device, "TCA")


def key_start_from_diagonal(mask: torch.Tensor | None, batch: int, seq_len: int, device) -> torch.Tensor:
    """(B,) count of leading padding keys of a whole-prompt mask, read off its diagonal (each
    query's own key: masked exactly for the padding queries). The last row, which
    key_start_from_mask reads, does not do for a sliding-window mask: its window starts late."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    diag = (mask[:, 0] if mask.dim() == 4 else mask).diagonal(dim1=-2, dim2=-1)[:, -seq_len:]
    return _leading_padding(diag, batch, seq_len, device, "the sliding-window kernel")


def _leading_padding(allowed: torch.Tensor, batch: int, seq_len: int, device, who: str) -> torch.Tensor:
    """(B,) leading masked entries of each row of `allowed` (bool, or an additive float mask);
    a masked entry after the first allowed one (right padding) is an error."""
    valid = allowed if allowed.dtype == torch.bool else allowed > torch.finfo(allowed.dtype).min / 2
    if valid.shape[0] != batch:
        valid = valid.expand(batch, -1)
    key_start = (~valid).long().cumprod(-1).sum(-1)
    holes = (~valid) & (torch.arange(seq_len, device=device)[None, :] >= key_start[:, None])
    if bool(holes.any()):
        raise ValueError(f"{who} supports left padding only (pass padding_side='left' to the tokenizer)")
    return key_start


class Session:
    """One model running one method. Build caches with new_cache(); close with disable()."""

    def __init__(self, model: nn.Module, method: Method | None, backend: dispatch.Backend = "auto",
                 observer: Observer | None = None, override: Override | None = None,
                 output_observer: Callable[[int, torch.Tensor], None] | None = None,
                 sliding_kernel: bool = True) -> None:
        self.arch = check_supported(model)
        dispatch.check_name(backend)
        method = Dense() if method is None else method
        if not isinstance(method, Method):
            raise TypeError(f"method must be a tca_attention Method (see tca_attention.create), got {type(method).__name__}")
        method.check_model(model)
        if override is not None and not method.is_dense:
            raise ValueError("an attention override runs on plain attention only (method=None)")
        # under tensor parallelism: this rank's heads, and the method on them (its per-head state sliced)
        self.shard = tensor_parallel.shard_of(model)
        if self.shard is not None:
            if observer is not None and self.shard.sharded:
                raise tensor_parallel.TensorParallelError(
                    "calibration needs every attention head, and this tensor-parallel rank holds only "
                    f"KV heads {list(self.shard.kv)}: calibrate in one process and load the state file on every rank")
            if self.shard.sharded and (why := method.split_heads_refusal()):
                raise tensor_parallel.TensorParallelError(
                    f"{method.name} cannot run on a tensor-parallel rank holding only KV heads {list(self.shard.kv)}: "
                    f"{why}; or run it in one process")
            method = tensor_parallel.shard_method(method, self.shard)
        # what a plan combining the heads of a layer sums and ranks over (Method.combines_heads)
        self.heads = tensor_parallel.heads_of(self.shard)
        self.model, self.method, self.backend, self.observer = model, method, backend, observer
        self.override = override  # a calibration's replacement of full-attention outputs (methods.base.Override)
        # observing sessions only: output_observer(layer_idx, out (B, L, H, D)) after each full layer's SDPA
        self.output_observer = output_observer
        # the model's sliding-window layers: a whole prompt's attention through the engine's windowed
        # kernel (exact; O(L x window)) instead of transformers' SDPA over a dense (L, L) mask
        self.sliding_kernel = sliding_kernel
        self.kinds = layer_kinds(model)
        self.max_positions = getattr(text_config(model), "max_position_embeddings", None)
        self.last_prefill: dict[int, dict[str, Any]] = {}  # layer -> retained / kept fraction
        self.cache: RaggedCache | Any = None  # the cache of the last generate()
        self.last_run: Any = None  # the last generate(cuda_graph=True) (static_decode.StaticRun)
        self._caches: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
        self._tracked: "weakref.WeakSet[RaggedCache]" = weakref.WeakSet()  # ragged caches to check
        self._before: dict[int, list[tuple[int, int, int]]] = {}
        self._keeps: dict[tuple[int, str], tuple[torch.Tensor, tuple[int, ...]]] = {}  # see _decode_keep
        self._hooks: list = []
        self._restore_impl: Callable[[], None] | None = None
        self._active = False

    # -- lifecycle --------------------------------------------------------------------------
    def enable(self) -> "Session":
        if self._active:
            return self
        adapter.check_version()
        self._resolve_model_crossover()  # before the model is patched: it runs plain forwards too
        adapter.register(ATTN_NAME, tca_attention_forward)
        modules = attention_modules(self.model)
        for m in modules:
            if m in _SESSIONS:
                raise RuntimeError("this model already has an active tca_attention session")
        self._restore_impl = adapter.set_attention(self.model, ATTN_NAME)
        for m in modules:
            _SESSIONS[m] = self
            self._hooks.append(m.register_forward_pre_hook(self._remember_cache, with_kwargs=True))
        self._hooks.append(self.model.register_forward_pre_hook(self._before_forward))
        self._hooks.append(self.model.register_forward_hook(self._after_forward))
        self._active = True
        return self

    def _resolve_model_crossover(self) -> None:
        """Measure (once, cached) the prompt length from which the method's prefill pays off through
        this whole model, when the method asks for it (TCA's dense_below="auto" on a GPU). Not on a
        tensor-parallel rank: its forwards are collective and the timer's repetitions are chosen per
        rank, so the ranks keep the per-layer crossover (methods/tca/crossover.py)."""
        param = next(self.model.parameters(), None)
        if param is None or self.shard is not None or not self.method.model_crossover_pending(param.device):
            return
        from .crossover_model import model_crossover

        self.method.use_model_crossover(param.device, model_crossover(self.model, self.method,
                                                                      sliding_kernel=self.sliding_kernel))

    def disable(self) -> None:
        if not self._active:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m in attention_modules(self.model):
            _SESSIONS.pop(m, None)
        self._restore_impl()
        self._active = False

    def __enter__(self) -> "Session":
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()

    def _remember_cache(self, module, args, kwargs):
        cache = adapter.cache_of_module_call(kwargs)
        self._caches[module] = cache
        if isinstance(cache, RaggedCache):
            self._tracked.add(cache)

    # -- the per-forward check ------------------------------------------------------------
    def _before_forward(self, model, args):
        self._before = {id(c): [l.calls.snapshot() for l in c.tca_layers()] for c in list(self._tracked)}

    def _after_forward(self, model, args, output):
        for cache in list(self._tracked):
            before = self._before.get(id(cache))
            for layer, (u0, c0, d0) in zip(cache.tca_layers(), before or ()):
                self._check_layer(cache, layer, layer.calls.updates - u0, layer.calls.commits - c0,
                                  layer.calls.decodes - d0)

    def _check_layer(self, cache: RaggedCache, layer: RaggedLayer, updates: int, commits: int, decodes: int) -> None:
        if updates == 0:
            return  # this cache was not part of the forward
        if commits + decodes != updates:
            raise CacheNotUsedError(
                f"transformers {adapter.transformers.__version__}: layer {cache.layers.index(layer)} stored new keys in the ragged cache "
                f"{updates} time(s) but attention planned a prefill {commits} time(s) and attended over the cache "
                f"{decodes} time(s): the attention function did not receive the cache (see docs/compatibility.md)"
            )
        if commits and layer.kv_bytes() == 0:  # after a prefill (decode only appends: no per-step cost)
            raise CacheNotUsedError(
                f"transformers {adapter.transformers.__version__}: layer {cache.layers.index(layer)} holds 0 bytes "
                "after a prefill"
            )

    # -- caches -------------------------------------------------------------------------------
    def new_cache(self, max_new_tokens: int | None = None) -> Any:
        """A cache for this session's method (a ragged cache; a DynamicCache for plain attention).
        Hand it to model()/generate() with `**session.cache_kwargs(cache)`, or use generate().

        max_new_tokens: a static ragged cache (static_cache.StaticRaggedCache) with storage for the
        prompt plus that many new tokens, whose decode steps (one token each) can be captured in a
        CUDA graph; generate(cuda_graph=True) runs it."""
        cfg = text_config(self.model)
        if max_new_tokens is not None:
            return self._static_cache(max_new_tokens)
        if self.method.is_dense:
            from transformers.cache_utils import DynamicCache

            return DynamicCache(config=self.model.config)
        cache = RaggedCache(self.kinds, self.method.block_size, self.method.window,
                         getattr(cfg, "sliding_window", None), self.backend)
        self._tracked.add(cache)
        return cache

    def _static_cache(self, max_new_tokens: int) -> StaticRaggedCache:
        name = getattr(self.method, "name", type(self.method).__name__)
        if self.method.is_dense:
            raise ValueError("plain attention decodes statically over transformers' StaticCache, sized from the "
                             "prompt: use session.generate(..., cuda_graph=True) or StaticCache(config, max_cache_len)")
        if not self.method.supports_static_decode():
            raise ValueError(f"{name}: its per-step decode work (select_decode, or a cache it needs such as "
                             "compensation entries) is not declared graph-safe "
                             "(Method.supports_static_decode), so it cannot run static decode steps; "
                             "use the dynamic cache (new_cache() / generate() without cuda_graph)")
        cache = StaticRaggedCache(self.kinds, self.method.block_size, self.method.window,
                                  getattr(text_config(self.model), "sliding_window", None), self.backend,
                                  max_new_tokens=max_new_tokens)
        self._tracked.add(cache)
        return cache

    @staticmethod
    def cache_kwargs(cache: Any) -> dict[str, Any]:
        """{keyword: cache} under the name the installed transformers expects."""
        return adapter.cache_kwargs(cache)

    def generate(self, *args, cuda_graph: bool = False, compile_layers: bool = False, compile_prefill: bool = False,
                 compile_tuning: bool = False, **kwargs):
        """model.generate() with a new cache of this session (kept as `session.cache`).

        cuda_graph=True: greedy decoding of exactly max_new_tokens tokens (no stop at EOS) with
        static decode steps captured in CUDA graphs and replayed (integration/static_decode.py; on
        the CPU the same static steps run eagerly). Takes input_ids, attention_mask (left padding)
        and max_new_tokens; returns the sequences (prompt + new tokens), the run is kept as
        `session.last_run` (timings). compile_layers (with cuda_graph): the decode steps run with
        the decoder layers compiled by torch.compile (integration/compiled_layers.py);
        compile_prefill (with compile_layers): the prompt's forward too (dynamic shapes: compiled
        on the first prompt, reused for any later length); compile_tuning (with compile_layers):
        inductor's GEMM autotuning and coordinate-descent tuning (longer compiles; on an H100 the
        8B shape's decode step 7.54 -> 6.75 ms)."""
        flags = [n for n, on in (("compile_layers", compile_layers), ("compile_prefill", compile_prefill),
                                 ("compile_tuning", compile_tuning)) if on]
        if flags and not cuda_graph:
            raise ValueError(f"{'/'.join(flags)}=True needs cuda_graph=True: it compiles the static decode steps")
        if not cuda_graph:
            self.cache = self.new_cache()
            return self.model.generate(*args, **kwargs, **self.cache_kwargs(self.cache))
        from .static_decode import greedy_static

        input_ids = args[0] if args else kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        if kwargs.pop("do_sample", False):
            _refuse("sampling (cuda_graph decoding is greedy)")
        if len(args) > 1 or kwargs:
            _refuse(f"arguments {sorted(kwargs) or 'positional'} (it takes input_ids, attention_mask, max_new_tokens)")
        if input_ids is None or max_new_tokens is None:
            _refuse("a call without input_ids and max_new_tokens")
        run = greedy_static(self.model, input_ids, attention_mask, max_new_tokens=max_new_tokens, session=self,
                            compile_layers=compile_layers, compile_prefill=compile_prefill,
                            compile_tuning=compile_tuning)
        self.cache, self.last_run = run.cache, run
        return run.sequences

    # -- the attention call -----------------------------------------------------------------
    def attend(self, call: adapter.AttentionCall):
        idx, q = call.layer_idx, call.query
        if self.shard is not None:
            self.shard.check_call(idx, q, call.key)
        if self.sliding_kernel and self.kinds[idx] == "sliding" and self.observer is None and _windowed_prompt(call):
            return self._sliding_prefill(call), None
        if self.kinds[idx] == "sliding" or self.method.is_dense or self.observer is not None:
            observed = self.observer is not None and self.kinds[idx] == "full"
            if observed:
                self.observer(idx, q, call.key, call.value, call.scaling)
            if self.override is not None and self.kinds[idx] == "full":
                if call.mask is not None:
                    raise ValueError("an attention override takes unpadded prompts (no attention mask)")
                out = self.override(idx, q, call.key, call.value, call.scaling)
                if out is not None:
                    return out, None
            out = adapter.sdpa(call)
            if observed and self.output_observer is not None:
                self.output_observer(idx, out[0])
            return out
        call.check_sparse()
        if self.max_positions and q.shape[2] > self.max_positions and idx == self.kinds.index("full"):
            warnings.warn(f"prompt of {q.shape[2]} tokens is beyond the model's trained length "
                          f"({self.max_positions})", stacklevel=2)
        cache = self._caches.get(call.module, _NOT_SEEN)
        if cache is _NOT_SEEN:
            raise adapter.AdapterError(
                f"attention for layer {idx} was called without its module's forward (no cache could be found)")
        layer = cache.layers[idx] if cache is not None else None
        if cache is not None and not isinstance(layer, RaggedLayer):
            raise TypeError(
                f"{getattr(self.method, 'name', 'this method')} needs its own cache: use session.generate(), or pass "
                f"session.new_cache() to the model (got {type(cache).__name__})"
            )
        if layer is not None and layer.pending is None:
            if layer.device != q.device:
                raise RuntimeError(f"cache on {layer.device} but queries on {q.device}")
            return layer.attend(q, call.scaling, self.method.select_decode(idx, q, layer)), None
        return self._prefill(call, layer)

    def _sliding_prefill(self, call: adapter.AttentionCall) -> torch.Tensor:
        """A sliding-window layer's whole-prompt attention, exactly, over (j - window, j] per query
        (transformers has already written the layer's cache)."""
        q, k = call.query, call.key
        B, L = q.shape[0], q.shape[2]
        key_start = key_start_from_diagonal(call.mask, B, L, q.device)
        plan = sliding_window_plan(B, k.shape[1], L, int(call.sliding_window), key_start)
        return dispatch.sparse_prefill(q, k, call.value, plan, call.scaling, backend=self.backend)

    def _prefill(self, call: adapter.AttentionCall, layer: RaggedLayer | None):
        idx, q, k, v = call.layer_idx, call.query, call.key, call.value
        B, _, L, _ = q.shape
        if L == 0:
            raise ValueError("empty prompt")
        key_start = key_start_from_mask(call.mask, B, L, q.device)
        lent = {"heads": self.heads} if self.method.combines_heads else {}
        plan = self.method.plan(idx, q, k, key_start, call.scaling, backend=self.backend, padded=call.mask is not None,
                                **lent)
        bias = self.method.key_bias(idx, q, k, key_start, call.scaling)
        if plan is None:
            out = adapter.sdpa(call)[0] if bias is None else dispatch.dense_prefill(q, k, v, call.scaling, bias, key_start)
            self.last_prefill[idx] = {"kept_fraction": None, "retained": None, "bound": None}
        else:
            if getattr(plan, "attend_all", False):  # the plan is what the cache keeps; prefill is plain attention
                out = adapter.sdpa(call)[0] if bias is None else dispatch.dense_prefill(q, k, v, call.scaling, bias,
                                                                                         key_start)
            else:
                out = dispatch.prefill(q, k, v, plan, call.scaling, backend=self.backend, key_bias=bias)
            # tensors, read on demand by prefill_report(): no host sync on the prefill path
            retained = getattr(plan, "retained", None)
            bound = None if retained is None else certificate.error_bound(retained, v, key_start)
            self.last_prefill[idx] = {"kept_fraction": plan.kept_fraction(L), "retained": retained, "bound": bound}
        self.method.observe_prefill(idx, out)
        if layer is not None:
            evicts = isinstance(plan, TokenPlan)  # a token plan is what the cache keeps; other plans keep all
            layer.commit_prefill(plan if evicts else None, key_start, *self._decode_keep(idx, k))
            layer.key_bias = bias  # applied at every decode step over this cache
        return out, None

    def _decode_keep(self, idx: int, k: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The method's decode keep counts of layer idx (a per-layer constant; a token plan carries
        the same), on k's device and on the host, made once per session: methods build them on the
        CPU, and copying them to the GPU at every prefill synchronised the stream once per layer
        (Qwen2.5-0.5B at 8K, batch 1, H100: the prefill 25-50% slower than plain attention)."""
        key = (idx, str(k.device))
        hit = self._keeps.get(key)
        if hit is None:
            keep = self.method.decode_keep(idx, k.shape[1])
            host = tuple(int(x) for x in keep.tolist())
            hit = self._keeps[key] = (keep.to(device=k.device, dtype=torch.long), host)
        return hit

    def prefill_report(self) -> dict[str, Any]:
        """The last prefill in a few numbers: mean over layers and heads of the kept fraction, and
        the quality certificate over every layer and KV head (engine/certificate.py): retained
        attention mass of the selection queries (mean, and the smallest), and the output-error
        bound computed from it (mean, and the largest). Dense layers retain 1 with bound 0;
        sparse plans of methods that do not score (retained None) are left out of both. Under
        tensor parallelism: over every rank's heads (collectives: every rank calls it)."""
        layers = {i: (_kept(r), _certificate(r)) for i, r in sorted(self.last_prefill.items())}
        method = self.method.report()
        if self.shard is not None:
            layers = tensor_parallel.merge_layer_rows(layers, self.shard)
            method = {**tensor_parallel.merge_method_reports(method, self.method, self.shard),
                      "tensor_parallel": {"world": self.shard.world, "heads_sharded": self.shard.sharded}}
        rows = list(layers.values())
        cert = [c for _, c in rows if c is not None]
        return {
            "kept_fraction": sum(kept for kept, _ in rows) / len(rows) if rows else None,
            "retained": sum(c["retained_mean"] for c in cert) / len(cert) if cert else None,
            "retained_min": min(c["retained_min"] for c in cert) if cert else None,
            "error_bound": max(c["bound_max"] for c in cert) if cert else None,
            "error_bound_mean": sum(c["bound_mean"] for c in cert) / len(cert) if cert else None,
            **method,
        }

    def cache_report(self, cache: Any = None) -> dict[str, float | int]:
        """KV bytes held by `cache` (default: the last generate()'s), the bytes a plain cache would
        hold for the same tokens, and the kept fraction of the sparse layers' key/value slots.
        Under tensor parallelism: over every rank's heads (a collective: every rank calls it)."""
        cache = self.cache if cache is None else cache
        if cache is None:
            raise ValueError("no cache to report on: pass one, or run session.generate() first")
        if isinstance(cache, RaggedCache):
            layers = cache.tca_layers()
            counts = [cache.kv_bytes(), cache.dense_kv_bytes(), sum(l.kept_tokens() for l in layers),
                      sum(l.dense_tokens() for l in layers)]
        else:  # a plain cache (the dense method): everything it holds
            held = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers if getattr(l, "keys", None) is not None)
            counts = [held, held, 0, 0]
        if self.shard is not None:
            counts = tensor_parallel.sum_over_ranks(counts, self.shard)
        held, dense, kept, total = counts
        return {"kv_bytes": held, "dense_kv_bytes": dense, "kept_fraction": kept / total if total else 1.0}


    def report(self) -> dict[str, Any]:
        """prefill_report() plus the certificate of every layer of the last prefill (reads the
        device tensors: call it after the forward, not inside it): "layers" lists, per layer,
        its kept fraction and min / mean retained mass and max / mean error bound over its
        (row, KV head) pairs, and "heads" the per-(row, KV head) retained masses and bounds.
        Under tensor parallelism the "layers" entries are this rank's heads (prefill_report's
        numbers are over every rank's)."""
        layers = []
        for idx, r in sorted(self.last_prefill.items()):
            c = _certificate(r)
            row: dict[str, Any] = {"layer": idx, "kept_fraction": None if r["kept_fraction"] is None
                                   else float(r["kept_fraction"].mean())}
            if c is not None:
                row.update(c)
            if r.get("retained") is not None:
                row["heads"] = {"retained": r["retained"].float().cpu().tolist(),
                                "bound": r["bound"].float().cpu().tolist()}
            layers.append(row)
        return {**self.prefill_report(), "layers": layers}


def _kept(row: dict[str, Any]) -> float:
    """Mean kept fraction of one layer's prefill record (1: dense)."""
    return 1.0 if row["kept_fraction"] is None else float(row["kept_fraction"].mean())


def _certificate(row: dict[str, Any]) -> dict[str, float] | None:
    """min / mean retained mass and max / mean error bound of one layer's prefill record."""
    if row["kept_fraction"] is None:  # dense: every key kept
        return {"retained_min": 1.0, "retained_mean": 1.0, "bound_max": 0.0, "bound_mean": 0.0}
    ret, bound = row.get("retained"), row.get("bound")
    if ret is None:
        return None
    ret, bound = ret.float(), bound.float()
    return {"retained_min": float(ret.min()), "retained_mean": float(ret.mean()),
            "bound_max": float(bound.max()), "bound_mean": float(bound.mean())}


def _refuse(what: str) -> None:
    raise TypeError(f"session.generate(cuda_graph=True) does not take {what}")


def enable(model: nn.Module, method: Method | None, backend: dispatch.Backend = "auto",
           sliding_kernel: bool = True) -> Session:
    """Run `model` with `method` until disable() or the end of the `with` block.

    method=None is Dense(): plain attention (a session whose new_cache() is a DynamicCache).
    sliding_kernel: a whole prompt's attention in the model's sliding-window layers (Gemma3's 5 of
    6) through the engine's windowed flash kernel, exact, instead of transformers' SDPA over a
    dense (L, L) mask; for every method, plain attention included (the default: on an H100 it
    prefills Gemma3-270M at 32K 3.9-5.3x faster, the same answers within bf16 rounding;
    False: transformers' own path).
    """
    return Session(model, method, backend, sliding_kernel=sliding_kernel).enable()


def _windowed_prompt(call: adapter.AttentionCall) -> bool:
    """Whether a sliding-window layer's call is a whole prompt longer than its window (no cached
    keys before it) that the windowed kernel computes exactly; anything else stays with SDPA."""
    L, Lk = call.query.shape[2], call.key.shape[2]
    return (call.sliding_window is not None and L == Lk and L > int(call.sliding_window) and call.dropout == 0.0
            and call.softcap is None
            and call.extra.get("is_causal", True) is not False and not call.unknown_kwargs())

