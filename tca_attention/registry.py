"""The one method registry: names, one spec syntax, and construction.

A spec is a name with optional parameters: `tca`, `tca:tau=0.7`, `streaming:window=1024,sinks=4`.
Parameter values are typed by the method's own fields (int, float, str, bool). A new method is one
file plus one `Entry` below. `create(spec, model=..., tokenizer=...)` builds it, calibrating (or
loading cached calibration) where the method needs it; `tca methods` prints `describe()`.

`normalize(spec)` is a spec's one written form (parameters in the Entry's order, typed values),
which names a method in results. An Entry may declare its density knob (`Density`): the parameter
that sets how much of the KV it keeps, so `at_density` can set it to keep a given fraction of a
prompt (the eval's matched-KV comparison). `expand` turns value lists `key=a|b|c` into specs.
"""
from __future__ import annotations

import dataclasses
import itertools
import typing
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable, Mapping

FULL = "full"  # plain attention (Dense): the reference every method is compared to


@dataclass(frozen=True)
class Density:
    """A method's density knob: `param` sets how much KV it keeps; `solve(kept_fraction,
    prompt_tokens, params)` is the knob value keeping about that fraction of a prompt of that
    many tokens after prefill, given the spec's other parameters."""

    param: str
    solve: Callable[[float, int, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str
    params: dict[str, type]  # parameters a spec may set, with their types
    build: Callable[..., Any]  # (params, model, tokenizer, extra) -> Method | None
    density: Density | None = None  # the knob `at_density` sets (None: the method cannot be matched)


def _tca(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    from .methods.tca.method import TCA

    if "budgets" in extra:  # a Budgets object handed in by the caller
        fixed = sorted(set(params) - {"tau", "score", "dense_below", *_TCA_RUNTIME})
        if fixed:
            raise ValueError(f"tca: {', '.join(fixed)} cannot change with budgets handed in (their calibration "
                             f"fixes them; only tau, score, dense_below and {', '.join(_TCA_RUNTIME)} can)")
        budgets = extra.pop("budgets")
        if "tau" in params or "score" in params:
            budgets = budgets.at(**{k: params[k] for k in ("tau", "score") if k in params})
    else:
        if model is None or tokenizer is None:
            raise ValueError("tca needs budgets: pass model= and tokenizer= (calibrates once, then cached), "
                             "or budgets=")
        from .integration.probe import load_or_calibrate
        from .introspect import text_config
        from .methods.tca.config import PRESETS, auto_preset

        preset = params.get("preset") or auto_preset(getattr(text_config(model), "max_position_embeddings", None))[0]
        if preset not in PRESETS:
            raise ValueError(f"unknown TCA preset {preset!r}; known: {', '.join(PRESETS)}")
        cfg = PRESETS[preset].with_(**{k: params[k] for k in ("window", "tau", "score", "alpha") if k in params})
        key = getattr(model, "name_or_path", None) or type(model).__name__
        budgets = load_or_calibrate(model, tokenizer, str(key), cfg, params.get("budgets"))
    if "dense_below" in params:  # "auto" or a length
        text = params["dense_below"]
        extra["dense_below"] = text if text == "auto" else _convert("tca", "dense_below", text, int)
    extra.update({k: params[k] for k in _TCA_RUNTIME if k in params})  # selection options (method.TCA)
    return TCA(budgets, **extra)


# TCA's selection options: fields of methods.tca.method.TCA, set per run (no recalibration)
_TCA_RUNTIME = ("last_q", "gqa", "floor")


def _head_split(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    """Head scores handed in (scores=HeadScores), from a file (scores=path), or calibrated once per
    model and cached (model= and tokenizer=)."""
    from .methods import head_split as hs

    knobs = {k: v for k, v in params.items() if k != "scores"}
    if "scores" in extra:
        scores = extra.pop("scores")
    elif "scores" in params:
        scores = hs.HeadScores.load(params["scores"], model=model)
    elif model is None or tokenizer is None:
        raise ValueError("head-split needs head scores: pass model= and tokenizer= (calibrates once, then cached), "
                         "scores=<file> in the spec, or scores=")
    else:
        from .integration.probe import ModelProbe

        key = getattr(model, "name_or_path", None) or type(model).__name__
        scores = hs.load_or_calibrate(ModelProbe(model), tokenizer, str(key))
    return hs.HeadSplit(scores, **knobs, **extra)


def _duo(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    """Gates handed in (gates=DuoGates), from a file (gates=path), or optimised once per model and
    cached (model= and tokenizer=)."""
    from .methods import duo

    knobs = {k: v for k, v in params.items() if k != "gates"}
    if "gates" in extra:
        gates = extra.pop("gates")
    elif "gates" in params:
        gates = duo.DuoGates.load(params["gates"], model=model)
    elif model is None or tokenizer is None:
        raise ValueError("duo needs gates: pass model= and tokenizer= (optimised once, then cached), "
                         "gates=<file> in the spec, or gates=")
    else:
        from .integration.probe import ModelProbe

        key = getattr(model, "name_or_path", None) or type(model).__name__
        gates = duo.load_or_optimise(ModelProbe(model), tokenizer, str(key))
    return duo.Duo(gates, **knobs, **extra)


def _razor(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    """Scores handed in (scores=RazorScores), from a file (scores=path), or calibrated once per model
    and cached (model=; the probe is random tokens, so no tokenizer is needed)."""
    from .methods import razor

    knobs = {k: v for k, v in params.items() if k != "scores"}
    if "scores" in extra:
        scores = extra.pop("scores")
    elif "scores" in params:
        scores = razor.RazorScores.load(params["scores"], model=model)
    elif model is None:
        raise ValueError("razor needs echo/induction scores: pass model= (calibrated once, then cached), "
                         "scores=<file> in the spec, or scores=")
    else:
        from .integration.probe import ModelProbe

        key = getattr(model, "name_or_path", None) or type(model).__name__
        scores = razor.load_or_calibrate(ModelProbe(model), str(key))
    return razor.Razor(scores, **knobs, **extra)


def _minference(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    """Patterns forced (pattern=<name>), handed in (state=PatternState), from a file (state=path),
    or searched once per model and cached (model= and tokenizer=)."""
    from .methods import minference as mi

    knobs = {k: v for k, v in params.items() if k != "state"}
    if "state" in extra:
        state = extra.pop("state")
    elif "state" in params:
        state = mi.PatternState.load(params["state"], model=model)
    elif params.get("pattern", "auto") != "auto":
        state = None
    elif model is None or tokenizer is None:
        raise ValueError("minference needs head patterns: pass model= and tokenizer= (searched once, then cached), "
                         "state=<file> in the spec, state=, or force one with pattern=<a-shape|vertical-slash|"
                         "block-sparse>")
    else:
        from .integration.probe import ModelProbe

        key = getattr(model, "name_or_path", None) or type(model).__name__
        state = mi.load_or_calibrate(ModelProbe(model), tokenizer, str(key))
    return mi.MInference(state, **knobs, **extra)


def _method_attr(path: str) -> Any:
    """`module.name` of tca_attention.methods, imported on first use."""
    module, _, name = path.rpartition(".")
    return getattr(import_module(f"{__package__}.methods.{module}"), name)


def _dataclass_build(cls_path: str) -> Callable[..., Any]:
    def build(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
        return _method_attr(cls_path)(**params, **extra)

    return build


def _lazy(path: str) -> Callable[..., Any]:
    """A function of tca_attention.methods, imported when first called."""
    return lambda *args, **kwargs: _method_attr(path)(*args, **kwargs)


ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry(FULL, "full attention (SDPA, dense cache): the reference", {}, _dataclass_build("dense.Dense")),
        Entry("tca", "TCA-Attention: calibrated per-head budgets + last-query adaptive token selection",
              {"tau": float, "score": str, "preset": str, "window": int, "alpha": float, "budgets": str,
               "dense_below": str, "last_q": int, "gqa": str, "floor": float},
              _tca),
        Entry("streaming", "StreamingLLM: attention sinks + a recent window (constant KV)",
              {"sinks": int, "window": int, "block_size": int}, _dataclass_build("streaming.StreamingLLM"),
              Density("window", _lazy("streaming.window_for"))),
        Entry("full-budget", "the sparse path keeping every token (equals full attention; a test oracle)",
              {"window": int, "block_size": int}, _dataclass_build("full_budget.FullBudget")),
        Entry("xattention", "XAttention: block-sparse prefill, blocks by antidiagonal scores up to a mass threshold",
              {"threshold": float, "stride": int, "block_size": int}, _dataclass_build("xattention.XAttention")),
        Entry("flexprefill", "FlexPrefill: per head query-aware or vertical-slash blocks (by a JS divergence) up to mass gamma",
              {"gamma": float, "tau": float, "min_budget": int, "block_size": int},
              _dataclass_build("flexprefill.FlexPrefill")),
        Entry("quest", "Quest: dense prefill, full cache; each decode step reads the top pages by a q.k upper bound",
              {"budget": int, "page_size": int, "skip_layers": int}, _dataclass_build("quest.Quest"),
              Density("budget", _lazy("quest.budget_for"))),
        Entry("head-split", "DuoAttention-style head split: retrieval heads full, the others sinks + window "
              "(training-free retrieval scores)",
              {"retrieval_fraction": float, "sinks": int, "window": int, "block_size": int, "scores": str},
              _head_split, Density("retrieval_fraction", _lazy("head_split.retrieval_fraction_for"))),
        Entry("duo", "DuoAttention: per-head gates optimised on synthetic passkey data (weights frozen); the "
              "highest-gated heads full, the others sinks + window",
              {"retrieval_fraction": float, "sinks": int, "window": int, "block_size": int, "gates": str},
              _duo, Density("retrieval_fraction", _lazy("duo.retrieval_fraction_for"))),
        Entry("razor", "RazorAttention: echo and induction heads (repeated-random-token probe) keep everything; "
              "the others sinks + window + one compensation token of what they drop (dense prefill)",
              {"retrieval_fraction": float, "echo_fraction": float, "sinks": int, "window": int, "block_size": int,
               "compensate": bool, "scores": str},
              _razor, Density("retrieval_fraction", _lazy("razor.retrieval_fraction_for"))),
        Entry("minference", "MInference: per head a-shape, vertical-slash or block-sparse prefill (offline "
              "pattern search, online vertical/slash estimation)",
              {"pattern": str, "vertical": int, "slash": int, "last_q": int, "block_size": int, "scale": float,
               "state": str},
              _minference),
        Entry("blasst", "BLASST (skip-softmax): dense block prefill skipping key blocks whose max logit is far below "
              "the running max (lambda = threshold, or scale_factor / length; full KV)",
              {"scale_factor": float, "threshold": float, "block_size": int}, _dataclass_build("blasst.BLASST")),
        Entry("hip", "HiP: per query block a hierarchical top-k tree search over key blocks, plus sink and local "
              "blocks (full KV)",
              {"k": int, "block_size": int, "sliding_window": int, "rep_tokens": int, "q_stride": int},
              _dataclass_build("hip.HiP"), Density("k", _lazy("hip.k_for"))),
        Entry("longheads", "LongHeads: each query head attends to its top chunks (query . pooled chunk keys) plus "
              "the first and local chunks", {"chunks": int, "chunk_size": int},
              _dataclass_build("longheads.LongHeads"), Density("chunks", _lazy("longheads.chunks_for"))),
        Entry("dhsa", "DHSA: dynamic key chunks, length-normalised chunk similarity upsampled to a token top-k "
              "per query block", {"budget": int, "block_size": int, "chunk_len": int, "boundary_window": int,
                                  "nms": int, "dense_tail": int},
              _dataclass_build("dhsa.DHSA"), Density("budget", _lazy("dhsa.budget_for"))),
        Entry("token-sparse", "Token Sparse Attention: per layer and query head, attend among a token subset "
              "(last-query scores, coverage tau) and scatter back; other tokens skip the layer (full KV)",
              {"coverage": float, "keep": float, "min_tokens": int, "recent": int, "kernel": int, "start": float},
              _dataclass_build("token_sparse.TokenSparse")),
        Entry("spatten", "SpAtten cascade token pruning: cumulative attention importance, pruned tokens stay "
              "pruned in later layers (geometric schedule to `keep`)",
              {"keep": float, "start": float, "window": int, "block_size": int, "heads": float},
              _dataclass_build("spatten.SpAtten"),
              Density("keep", _lazy("spatten.keep_for"))),
    )
}


def names() -> list[str]:
    return sorted(ENTRIES)


def _convert(name: str, key: str, text: str, kind: type) -> Any:
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}: {key}={text!r} is not a valid {kind.__name__}") from None


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'name:key=value,key=value' -> (name, typed params); clear errors for anything unknown."""
    name, _, rest = spec.strip().partition(":")
    if name not in ENTRIES:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(names())} (see `tca methods`)")
    entry, params = ENTRIES[name], {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise ValueError(f"{name}: parameter {item!r} should be key=value")
        if key not in entry.params:
            known = ", ".join(entry.params) or "none"
            raise ValueError(f"{name}: unknown parameter {key!r} (known: {known})")
        if key in params:
            raise ValueError(f"{name}: parameter {key!r} given twice")
        params[key] = _convert(name, key, value.strip(), entry.params[key])
    return name, params


def _format_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)


def format_spec(name: str, params: Mapping[str, Any]) -> str:
    """The written form of (name, params): parameters in the Entry's order."""
    order = [k for k in ENTRIES[name].params if k in params]
    return name + (":" + ",".join(f"{k}={_format_value(params[k])}" for k in order) if order else "")


def normalize(spec: str) -> str:
    """A spec's one written form: ' tca:score=observation, tau=0.70' -> 'tca:tau=0.7,score=observation'."""
    return format_spec(*parse_spec(spec))


def expand(spec: str) -> list[str]:
    """Value lists to specs, every combination in order: 'tca:tau=0.5|0.9,score=a|b' ->
    tca:tau=0.5,score=a; tca:tau=0.5,score=b; tca:tau=0.9,score=a; tca:tau=0.9,score=b."""
    name, colon, rest = spec.strip().partition(":")
    items = [item.strip() for item in rest.split(",")] if colon else []
    choices = []
    for item in items:
        key, eq, values = item.partition("=")
        choices.append([f"{key}{eq}{v.strip()}" for v in values.split("|")] if eq else [item])
    return [name + (":" + ",".join(combo) if colon else "") for combo in itertools.product(*choices)]


def density_param(name: str) -> str:
    """The parameter `at_density` sets for method `name`; an error if it has none."""
    entry = ENTRIES[name]
    if entry.density is None:
        knobs = ", ".join(e.name for e in ENTRIES.values() if e.density is not None)
        raise ValueError(f"{name} declares no density knob, so it cannot be matched to a kept fraction "
                         f"(methods with one: {knobs})")
    return entry.density.param


def at_density(spec: str, kept_fraction: float, prompt_tokens: int) -> str:
    """`spec` with its density knob set to keep about kept_fraction of a prompt_tokens prompt."""
    name, params = parse_spec(spec)
    param = density_param(name)
    if param in params:
        raise ValueError(f"{name}: {param} is set by the density match; leave it out of {spec!r}")
    value = ENTRIES[name].density.solve(kept_fraction, prompt_tokens, params)
    return format_spec(name, {**params, param: value})


def create(spec: str, *, model=None, tokenizer=None, **extra: Any):
    """Build the method a spec names. Keyword arguments beyond model/tokenizer go to the method
    as they are (objects a spec cannot spell, e.g. budgets=)."""
    name, params = parse_spec(spec)
    entry = ENTRIES[name]
    overlap = set(params) & set(extra)
    if overlap:
        raise ValueError(f"{name}: {sorted(overlap)} given both in the spec and as arguments")
    return entry.build(params, model, tokenizer, dict(extra))


def describe() -> str:
    """One line per method with its parameters (what `tca methods` prints)."""
    width = max(map(len, ENTRIES))
    lines = []
    for e in ENTRIES.values():
        params = ", ".join(f"{k}:{t.__name__}" for k, t in e.params.items())
        knob = f"; density knob: {e.density.param}" if e.density else ""
        lines.append(f"{e.name:<{width}}  {e.summary}" + (f"  [{params}{knob}]" if params else ""))
    return "\n".join(lines)


def _check_params_match_fields() -> None:  # used by the tests: specs and dataclass fields agree
    from .methods.blasst import BLASST
    from .methods.flexprefill import FlexPrefill
    from .methods.full_budget import FullBudget
    from .methods.head_split import HeadSplit
    from .methods.hip import HiP
    from .methods.dhsa import DHSA
    from .methods.duo import Duo
    from .methods.longheads import LongHeads
    from .methods.minference import MInference
    from .methods.quest import Quest
    from .methods.razor import Razor
    from .methods.spatten import SpAtten
    from .methods.streaming import StreamingLLM
    from .methods.token_sparse import TokenSparse
    from .methods.xattention import XAttention

    # head-split's and razor's `scores`, duo's `gates` and minference's `state`: a file path in a spec, a state object in the dataclass
    for name, cls, apart in (("streaming", StreamingLLM, ()), ("full-budget", FullBudget, ()),
                             ("xattention", XAttention, ()), ("flexprefill", FlexPrefill, ()), ("quest", Quest, ()),
                             ("head-split", HeadSplit, ("scores",)), ("duo", Duo, ("gates",)),
                             ("razor", Razor, ("scores",)), ("minference", MInference, ("state",)),
                             ("blasst", BLASST, ()), ("hip", HiP, ()),
                             ("longheads", LongHeads, ()), ("dhsa", DHSA, ()),
                             ("token-sparse", TokenSparse, ()), ("spatten", SpAtten, ())):
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("name", *apart)}
        assert set(ENTRIES[name].params) - set(apart) == fields, (name, fields)
        assert all(hints[k] is t for k, t in ENTRIES[name].params.items() if k not in apart), name
