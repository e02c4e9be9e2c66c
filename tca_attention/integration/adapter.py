"""The one place that knows how a transformers release calls attention.

transformers changes the details every few releases: up to 5.23 decoder layers hand the cache to
attention modules (and models and generate() take it) as `past_key_values=`; from 5.24 the name
is `cache=` (the old one is deprecated, removal announced for 5.40). The attention function
receives `attention_mask` (None for an unpadded causal prefill), `sliding_window` on
sliding-window layers, and other keywords that only SDPA needs. Everything else in the library
asks this module; a call it does not recognise raises `AdapterError` naming the installed
release, instead of running with a wrong guess (a missed cache once gave silent junk).

To support a new release: add a `Convention` row if it changed how attention is called, widen
`TESTED`, run the compatibility stage (docs/compatibility.md).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# The releases the compatibility stage runs (inclusive); pyproject's range ends at the next minor.
TESTED = (Version("5.23.0"), Version("5.25.99"))


class AdapterError(RuntimeError):
    """transformers called attention in a way this adapter does not know."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"transformers {transformers.__version__}: {what}. tca-attention supports transformers "
            f"{TESTED[0].base_version} to {TESTED[1].major}.{TESTED[1].minor}.x; see docs/compatibility.md"
        )


@dataclass(frozen=True)
class Convention:
    """How one range of transformers releases passes the cache around."""

    since: Version
    cache_kwarg: str  # decoder layer -> attention module, model.forward(), generate()


CONVENTIONS = (
    Convention(Version("5.0.0"), "past_key_values"),
    Convention(Version("5.24.0.dev0"), "cache"),
)
# Keywords of attention calls whose meaning the sparse path knows (others make it refuse the call).
_KNOWN_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "output_attentions", "sliding_window",
                           "softcap", "is_causal"})
# Names a decoder layer may pass the cache under, newest first (a family not yet migrated may
# still use the deprecated one; the module's own deprecation shim accepts both).
_CACHE_NAMES = ("cache", "past_key_values")


# Keywords for `from_pretrained`. transformers 5.25 turned hub kernels on by default: a load would
# fetch kernels from the hub (no hub access here) and replace layers with code we did not test.
# Every release from 5.23 accepts `use_kernels`; we always pass it off.
LOAD_KWARGS: dict[str, Any] = {"use_kernels": False}


@lru_cache(maxsize=None)
def convention(version: str | None = None) -> Convention:
    """The convention of `version` (default: the installed transformers)."""
    v = Version(version or transformers.__version__)
    return [c for c in CONVENTIONS if v >= c.since][-1]


def check_version(version: str | None = None) -> None:
    """Warn once when the installed transformers is outside the tested range."""
    v = Version(version or transformers.__version__)
    if not TESTED[0] <= v <= TESTED[1]:
        warnings.warn(
            f"transformers {v} is outside the range tca-attention was tested with "
            f"({TESTED[0].base_version} to {TESTED[1].major}.{TESTED[1].minor}.x); every forward is checked, "
            "and a call this adapter does not know raises AdapterError",
            stacklevel=3,
        )


def cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """Keyword arguments that hand `cache` to model.forward() or generate() on this release."""
    return {convention().cache_kwarg: cache}


def cache_of_module_call(kwargs: dict[str, Any]) -> Cache | None:
    """The cache a decoder layer passed to an attention module (from a forward pre-hook's kwargs).

    None means the layer really passed no cache (use_cache=False). A call with no cache keyword at
    all is a calling convention this adapter does not know: raise rather than run cacheless.
    """
    for name in _CACHE_NAMES:
        if name in kwargs:
            return kwargs[name]
    raise AdapterError(
        "an attention module was called without a cache keyword "
        f"(expected one of {', '.join(_CACHE_NAMES)}; got {', '.join(sorted(kwargs)) or 'none'})"
    )


@dataclass(frozen=True)
class AttentionCall:
    """One call of the registered attention function, checked and normalised."""

    module: torch.nn.Module
    layer_idx: int
    query: torch.Tensor  # (B, H, L, D)
    key: torch.Tensor  # (B, KV, Lk, D)
    value: torch.Tensor  # (B, KV, Lk, Dv)
    mask: torch.Tensor | None  # None: causal, no padding
    dropout: float
    scaling: float
    sliding_window: int | None
    softcap: float | None
    extra: dict[str, Any]  # everything else, passed through to SDPA untouched

    def unknown_kwargs(self) -> list[str]:
        """Keywords of this call that the library's executors do not know (SDPA would take them)."""
        return sorted(set(self.extra) - _KNOWN_KWARGS)

    def check_sparse(self) -> None:
        """Raise unless the sparse executors compute what this call asks for."""
        unknown = self.unknown_kwargs()
        if unknown:
            raise AdapterError(f"attention was called with keyword(s) {unknown} that the sparse path does not know")
        if self.softcap is not None:
            raise AdapterError("attention logit softcapping is not implemented by the sparse executors")
        if self.sliding_window is not None:
            raise AdapterError(f"layer {self.layer_idx} was planned as a full-attention layer but transformers "
                               f"called it with sliding_window={self.sliding_window}")


def parse_attention_call(module, query, key, value, attention_mask, dropout, scaling, kwargs) -> AttentionCall:
    """Check the call against the 5.x attention-function signature; raise AdapterError otherwise."""
    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int):
        raise AdapterError(f"the attention module {type(module).__name__} has no integer layer_idx")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise AdapterError(f"attention {name} should be a (batch, heads, length, dim) tensor, got {shape}")
    B, H, _, D = query.shape
    if key.shape[0] != B or value.shape[0] != B or key.shape[-1] != D or H % key.shape[1] or key.shape[:3] != value.shape[:3]:
        raise AdapterError(
            f"attention shapes do not fit (query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}); "
            "expected query (B, H, L, D), key/value (B, KV, L, D) with KV dividing H"
        )
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise AdapterError(f"attention_mask of type {type(attention_mask).__name__} (expected a tensor or None)")
    scale = getattr(module, "scaling", None) if scaling is None else scaling
    if scale is None:
        scale = D ** -0.5
    extra = dict(kwargs)
    return AttentionCall(module, layer_idx, query, key, value, attention_mask, float(dropout or 0.0),
                         float(scale), extra.get("sliding_window"), extra.get("softcap"), extra)


def sdpa(call: AttentionCall) -> tuple[torch.Tensor, None]:
    """Plain attention for a call (transformers' own SDPA path, masks and windows included)."""
    out, _ = sdpa_attention_forward(call.module, call.query, call.key, call.value, call.mask,
                                    dropout=call.dropout, scaling=call.scaling, **call.extra)
    return out, None


def register(name: str, fn: Callable) -> None:
    """Register an attention function (and SDPA's mask builder: without a mask function the
    attention function would get no mask at all, silently dropping padding and windows)."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation the model's text config runs (e.g. "sdpa", or ours)."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return cfg._attn_implementation


def swap_attention_function(name: str, wrap: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Register wrap(f) under `name`, f being the function registered there now (transformers'
    own for "sdpa"); return a function that registers f again."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = ALL_ATTENTION_FUNCTIONS[name]
    AttentionInterface.register(name, wrap(before))

    def restore() -> None:
        AttentionInterface.register(name, before)

    return restore


def set_attention(model: torch.nn.Module, name: str) -> Callable[[], None]:
    """Switch `model` to attention implementation `name`; return a function that puts back
    exactly what every (sub)config had, without re-validating it (a model may run an
    implementation its class would not accept by name, e.g. a test's SDPA reference)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    for c in list(configs.values()):
        if hasattr(c, "get_text_config"):
            t = c.get_text_config(decoder=True)
            configs.setdefault(id(t), t)
    before = {k: c._attn_implementation for k, c in configs.items()}
    model.set_attn_implementation(name)

    def restore() -> None:
        for k, c in configs.items():
            c._attn_implementation = before[k]

    return restore


# -- tensor parallelism -------------------------------------------------------------------------
# transformers 5.x shards a model at load time: from_pretrained(..., distributed_config=
# DistributedConfig(tp_plan="auto")) under torchrun (from_config models are never sharded). The
# model's tp_plan maps module names (layer numbers as "*") to styles; a "colwise" key projection
# hands each rank's attention function its own contiguous slice of the KV heads (and of the query
# heads: query (B, H / world, L, D)), rank r holding heads [r * n / world, (r + 1) * n / world);
# styles that gather the projection's output (models with q/k norms or a fused qkv projection)
# give every rank all heads. The mesh lives in model._mesh_manager (set by maybe_distribute_model).
_HEADS_SHARDED = frozenset({"colwise"})
_HEADS_WHOLE = frozenset({"colwise_gather_output", "colwise_rep"})


@dataclass(frozen=True)
class TensorParallelLayout:
    """How transformers' tensor parallelism splits a model's attention across the ranks of its TP mesh."""

    rank: int  # this process's rank within the TP mesh
    world: int  # the TP mesh's size
    heads_sharded: bool  # attention sees this rank's slice of the heads (else every head)
    group: Any = field(default=None, compare=False, repr=False)  # the TP mesh's process group
    style: str | None = None  # the key projection's TP style (None: the projection is not sharded)


def tensor_parallel_layout(model: torch.nn.Module) -> TensorParallelLayout | None:
    """The layout of a model loaded with tensor parallelism (tp_size > 1); None otherwise."""
    from ..introspect import attention_modules

    dcfg = getattr(model.config, "distributed_config", None)
    if int(getattr(dcfg, "tp_size", None) or 1) <= 1:
        return None
    manager = getattr(model, "_mesh_manager", None)
    if manager is None:
        raise AdapterError("the model's config has tp_size > 1 but the model has no device mesh "
                           "(_mesh_manager): load it with from_pretrained(..., distributed_config=...)")
    mesh = manager.get_mesh("tp")
    attn = attention_modules(model)[0]
    name = next(n for n, m in model.named_modules() if m is attn)
    proj = next((p for p in ("k_proj", "qkv_proj", "query_key_value") if hasattr(attn, p)), None)
    if proj is None:
        raise AdapterError(f"{type(attn).__name__} has no key projection (k_proj, qkv_proj or query_key_value) "
                           "whose tensor-parallel style says how its heads are split")
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    plan = getattr(model, "tp_plan", None) or {}
    style = plan.get(replace_layer_number_by_wildcard(f"{name}.{proj}"))
    if style in _HEADS_SHARDED and proj != "k_proj":
        raise AdapterError(f"a fused {proj} sharded {style!r} splits queries, keys and values together; "
                           "tca-attention supports a sharded k_proj, or a gathered fused projection")
    if style is not None and style not in _HEADS_SHARDED | _HEADS_WHOLE:
        raise AdapterError(f"the key projection's tensor-parallel style {style!r} is not one this adapter knows "
                           f"(known: {', '.join(sorted(_HEADS_SHARDED | _HEADS_WHOLE))})")
    return TensorParallelLayout(mesh.get_local_rank(), mesh.size(), style in _HEADS_SHARDED, mesh.get_group(), style)


# -- static decode steps (integration/static_decode.py) ------------------------------------------
# A graph-captured decode step cannot let transformers build its masks: the sizes it reads from a
# cache are host ints. The runner passes 4D boolean masks of static shape instead, which every
# supported model uses as given (a dict by layer type where a model mixes full and sliding
# layers), built on the device from a position counter: transformers' StaticLayer holds cache
# index j in slot j; a StaticWindowLayer ring holds position p in slot p % size.


def static_dense_cache(model: torch.nn.Module, max_cache_len: int) -> Cache:
    """transformers' StaticCache for plain attention (the dense baseline of static decoding), its
    sliding-window layers replaced by graph-safe rings (static_cache.StaticWindowLayer)."""
    from transformers.cache_utils import StaticCache

    from ..introspect import layer_kinds, text_config
    from ..static_cache import StaticWindowLayer

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    window = getattr(text_config(model), "sliding_window", None)
    for i, kind in enumerate(layer_kinds(model)):
        if kind == "sliding":
            cache.layers[i] = StaticWindowLayer(min(window, max_cache_len))
    return cache


def _first_layer(cache: Cache, kinds: list[str], kind: str):
    return next((cache.layers[i] for i, k in enumerate(kinds) if k == kind), None)


def _layer_mask(layer, key_start: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, S) mask of one static layer's S slots for the token at cache index pos (1,)."""
    from transformers.cache_utils import StaticLayer

    from ..static_cache import StaticWindowLayer

    B = key_start.shape[0]
    if isinstance(layer, StaticWindowLayer):  # ring: slot j holds the latest p <= pos with p = j mod S
        slot = torch.arange(layer.max_cache_len, device=pos.device)
        p = pos - torch.remainder(pos - slot, layer.max_cache_len)  # (S,), < 0 where never written
    elif isinstance(layer, StaticLayer) and not layer.is_sliding:
        p = torch.arange(layer.max_cache_len, device=pos.device)
    elif isinstance(layer, StaticLayer):
        raise TypeError("transformers' StaticSlidingWindowLayer cannot run graph-captured steps; "
                        "use adapter.static_dense_cache (window layers as rings)")
    else:  # a ragged layer attends by its own stored positions: the mask is not read
        return torch.ones(B, 1, 1, 1, dtype=torch.bool, device=pos.device)
    vis = (p[None, :] >= key_start[:, None]) & (p[None, :] <= pos)  # (B, S)
    return vis[:, None, None, :]


def static_decode_mask(kinds: list[str], cache: Cache, key_start: torch.Tensor, pos: torch.Tensor):
    """The attention_mask argument of one decode step over a static cache: a 4D boolean tensor, or
    {"full_attention": ..., "sliding_attention": ...} when the model has both kinds of layers.
    key_start (B,): leading padding of each row; pos (1,): the new token's cache index (device)."""
    masks = {name: _layer_mask(layer, key_start, pos)
             for name, kind in (("full_attention", "full"), ("sliding_attention", "sliding"))
             if (layer := _first_layer(cache, kinds, kind)) is not None}
    return masks if len(masks) > 1 else next(iter(masks.values()))
