"""The one method registry: names, one spec syntax, and construction.

A spec is a name with optional parameters: `tca`, `tca:tau=0.7`, `streaming:window=1024,sinks=4`.
Parameter values are typed by the method's own fields (int, float, str, bool). A new method is one
file plus one `Entry` below. `create(spec, model=..., tokenizer=...)` builds it, calibrating (or
loading cached calibration) where the method needs it; `tca methods` prints `describe()`.

Composition: `base+calibrator` stacks an attention calibrator (an Entry with calibrator=True:
ZeroTuning, ACT) on any method, e.g. `tca+zerotuning`, `streaming:window=1024+act`: the base's plans
plus the calibrator's key logit bias (methods/compose.Calibrated); a calibrator alone composes with
`full`. `split(spec)` gives the two parts; the functions below take composite specs, except
`parse_spec` and `format_spec`, which read and write one part.

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
# The library's default configuration (what `tca demo`, `tca generate`, `tca eval` and the examples
# run): TCA with importance pooled over the last 16 queries and a strongly attended token's
# neighbours kept with it, chosen by the accuracy measurements (docs/method.md, "The default
# configuration"). A spec means the same thing forever: the bare `tca` stays the paper's rule
# (the last query alone), so results labelled `tca:...` keep their meaning.
DEFAULT_METHOD = "tca:last_q=16,span=7"
PAPER_METHOD = "tca"


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
    calibrator: bool = False  # an attention calibrator: builds a compose.Calibrator, stacked with '+'
    sweep: str | None = None  # without a density knob: the parameter a sweep trades work for accuracy with
    questions_only: bool = False  # answers a question about a context: tasks without one (perplexity) do not apply


def _tca(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    from .methods.tca.method import TCA

    if "budgets" in extra:  # a Budgets object handed in by the caller
        fixed = sorted(set(params) - {"tau", "score", "dense_below", *_TCA_RUNTIME, *_PROBE_PARAMS})
        if fixed:
            raise ValueError(f"tca: {', '.join(fixed)} cannot change with budgets handed in (their calibration "
                             f"fixes them; only tau, score, dense_below, {', '.join(_TCA_RUNTIME)} and "
                             f"{', '.join(_PROBE_PARAMS)} can)")
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
        plan = calibration_set(params)
        if plan is not None and "budgets" in params:
            raise ValueError("tca: calib_* set how to calibrate, but budgets= hands in calibrated budgets")
        budgets = load_or_calibrate(model, tokenizer, str(key), cfg, params.get("budgets"), plan=plan)
    if "dense_below" in params:  # "auto" or a length
        text = params["dense_below"]
        extra["dense_below"] = text if text == "auto" else _convert("tca", "dense_below", text, int)
    extra.update({k: params[k] for k in _TCA_RUNTIME if k in params})  # selection options (method.TCA)
    probe_keys = sorted(k for k in _PROBE_PARAMS if k in params)
    if str(params.get("dense_at", "")).strip() == "auto":  # the layers the per-layer probe finds
        extra["dense_at"] = _probed_dense_layers(params, budgets, model, tokenizer)
    elif probe_keys:
        raise ValueError(f"tca: {', '.join(probe_keys)} only apply with dense_at=auto")
    elif "dense_at" in params:  # layer indices joined by '/': 7/18
        extra["dense_at"] = tuple(_convert("tca", "dense_at", v, int) for v in str(params["dense_at"]).split("/")
                                  if v.strip())
    return TCA(budgets, **extra)


# dense_at=auto: the per-layer probe's settings (methods/tca/layer_probe.py)
_PROBE_PARAMS = ("probe_min", "probe_max_kl", "probe_length", "probe_prompts")


def _probed_dense_layers(params: dict[str, Any], budgets, model, tokenizer) -> tuple[int, ...]:
    """dense_at=auto: TCA's layers whose answers, probed one layer at a time at the budgets' tau,
    agree with dense attention's less than probe_min or differ by more than probe_max_kl nats per
    answer token (cached per model, budgets and options)."""
    from .methods.tca.layer_probe import DEFAULT_MAX_KL, DEFAULT_MIN_AGREEMENT, ProbeSettings, load_or_probe

    if model is None or tokenizer is None:
        raise ValueError("tca: dense_at=auto probes the model: pass model= and tokenizer=")
    if "dense_layers" in params:
        raise ValueError("tca: dense_at=auto chooses the dense layers itself; drop dense_layers")
    from .integration.probe import ModelProbe

    settings = ProbeSettings(length=params.get("probe_length"), prompts=params.get("probe_prompts", 4))
    options = {k: params[k] for k in _TCA_RUNTIME if k in params and k not in ("dense_at", "dense_layers")}
    key = str(getattr(model, "name_or_path", None) or type(model).__name__)
    probe = load_or_probe(ModelProbe(model), tokenizer, key, budgets, options, settings)
    return probe.dense_layers(params.get("probe_min", DEFAULT_MIN_AGREEMENT), params.get("probe_max_kl", DEFAULT_MAX_KL))


def calibration_set(params: Mapping[str, Any]):
    """TCA's calib_samples / calib_lengths (token counts joined by '/') / calib_combine -> a
    CalibrationSet, or None when none is given (the paper's single pass)."""
    if not any(k in params for k in CALIBRATION_PARAMS):
        return None
    from .methods.tca.calibration import CalibrationSet

    lengths = CalibrationSet.parse_lengths(params["calib_lengths"]) if "calib_lengths" in params else ()
    return CalibrationSet(samples=params.get("calib_samples", 1), lengths=lengths,
                          combine=params.get("calib_combine", "mean"))


# TCA's calibration-set parameters (how the budgets are calibrated: a separate calibration each)
CALIBRATION_PARAMS = ("calib_samples", "calib_lengths", "calib_combine")
# TCA's selection options: fields of methods.tca.method.TCA, set per run (no recalibration)
_TCA_RUNTIME = ("last_q", "gqa", "floor", "span", "dense_layers", "dense_at")


def _state(method: str, param: str, what: str, params: dict[str, Any], model, tokenizer, extra: dict[str, Any],
           load: Callable[..., Any], calibrate: Callable[..., Any], *, uses_tokenizer: bool = True,
           forced: bool = False, hint: str = "") -> tuple[Any, dict[str, Any]]:
    """A method's calibrated state: handed in (the `param` keyword of create), from a file (`param`=path
    in the spec), None when `forced` (a spec setting makes it unneeded), or calibrated once per model
    and cached (calibrate(probe, [tokenizer,] key)). -> (state, the spec's other parameters)."""
    knobs = {k: v for k, v in params.items() if k != param}
    if param in extra:
        return extra.pop(param), knobs
    if param in params:
        return load(params[param], model=model), knobs
    if forced:
        return None, knobs
    if model is None or (uses_tokenizer and tokenizer is None):
        need = "model= and tokenizer=" if uses_tokenizer else "model="
        raise ValueError(f"{method} needs {what}: pass {need} (calibrated once, then cached), {param}=<file> in the "
                         f"spec, or {param}={hint}")
    from .integration.probe import ModelProbe

    key = str(getattr(model, "name_or_path", None) or type(model).__name__)
    args = (tokenizer, key) if uses_tokenizer else (key,)
    return calibrate(ModelProbe(model), *args), knobs


def _head_split(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    from .methods import head_split as hs

    scores, knobs = _state("head-split", "scores", "head scores", params, model, tokenizer, extra,
                           hs.HeadScores.load, hs.load_or_calibrate)
    return hs.HeadSplit(scores, **knobs, **extra)


def _duo(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    from .methods import duo

    gates, knobs = _state("duo", "gates", "gates", params, model, tokenizer, extra, duo.DuoGates.load,
                          duo.load_or_optimise)
    return duo.Duo(gates, **knobs, **extra)


def _razor(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    from .methods import razor  # the probe is random tokens: no tokenizer

    scores, knobs = _state("razor", "scores", "echo/induction scores", params, model, tokenizer, extra,
                           razor.RazorScores.load, razor.load_or_calibrate, uses_tokenizer=False)
    return razor.Razor(scores, **knobs, **extra)


def _minference(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    from .methods import minference as mi

    state, knobs = _state("minference", "state", "head patterns", params, model, tokenizer, extra,
                          mi.PatternState.load, mi.load_or_calibrate,
                          forced=params.get("pattern", "auto") != "auto",
                          hint=", or force one with pattern=<a-shape|vertical-slash|block-sparse>")
    return mi.MInference(state, **knobs, **extra)


def _moa(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
    from .methods import moa  # the rules are searched at `density` from the profile

    profile, knobs = _state("moa", "profile", "an influence profile", params, model, tokenizer, extra,
                            moa.MoAProfile.load, moa.load_or_calibrate)
    return moa.MoA(profile, **knobs, **extra)


def _calibrator(module: str, needs: str):
    """Build function of a calibrator entry: its state handed in (state=HeadTable), from a file
    (state=path), not needed (`needs`, e.g. scale=), or calibrated once per model and cached."""

    def build(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
        from .methods import compose
        from .methods.state import HeadTable

        mod = import_module(f"{__package__}.methods.{module}")
        knobs = {k: v for k, v in params.items() if k != "state"}
        search = {k: params[k] for k in ("objective", "granularity", "length") if k in params}
        if "state" in extra:
            state = extra.pop("state")
        elif "state" in params:
            state = HeadTable.load(params["state"], mod.NAME, model=model)
        elif mod.needs_no_state(knobs):
            state = None
        elif model is None or tokenizer is None:
            raise ValueError(f"{mod.NAME} needs its calibration: pass model= and tokenizer= (calibrated once, then "
                             f"cached), state=<file> in the spec, state=, or {needs}")
        else:
            from .integration.probe import ModelProbe

            key = getattr(model, "name_or_path", None) or type(model).__name__
            state = mod.load_or_calibrate(ModelProbe(model), tokenizer, str(key), compose.Search(**search),
                                          **mod.calibration_knobs(knobs))
        return mod.CALIBRATOR(state, **knobs, **extra)

    return build


def _method_attr(path: str) -> Any:
    """`module.name` of tca_attention.methods, imported on first use."""
    module, _, name = path.rpartition(".")
    return getattr(import_module(f"{__package__}.methods.{module}"), name)


def _dataclass_build(cls_path: str) -> Callable[..., Any]:
    def build(params: dict[str, Any], model, tokenizer, extra: dict[str, Any]):
        return _method_attr(cls_path)(**params, **extra)

    build.cls_path = cls_path  # type: ignore[attr-defined]  # read by _check_params_match_fields
    return build


# Entries with their own builder (state calibrated or loaded) whose spec parameters are still the
# dataclass's fields, less the ones naming a state file: (class path, those parameters)
STATE_BUILT: dict[str, tuple[str, tuple[str, ...]]] = {
    "head-split": ("head_split.HeadSplit", ("scores",)),
    "duo": ("duo.Duo", ("gates",)),
    "razor": ("razor.Razor", ("scores",)),
    "minference": ("minference.MInference", ("state",)),
    "zerotuning": ("zerotuning.ZeroTuning", ("state",)),
    "act": ("act.ACT", ("state",)),
    "moa": ("moa.MoA", ("profile",)),
}


def _lazy(path: str) -> Callable[..., Any]:
    """A function of tca_attention.methods, imported when first called."""
    return lambda *args, **kwargs: _method_attr(path)(*args, **kwargs)


ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry(FULL, "full attention (SDPA, dense cache): the reference", {}, _dataclass_build("dense.Dense")),
        Entry("tca", "TCA-Attention: calibrated per-head budgets + last-query adaptive token selection",
              {"tau": float, "score": str, "preset": str, "window": int, "alpha": float, "budgets": str,
               "dense_below": str, "last_q": int, "gqa": str, "floor": float, "span": int, "dense_layers": int,
               "dense_at": str, "probe_min": float, "probe_max_kl": float, "probe_length": int, "probe_prompts": int,
               "calib_samples": int, "calib_lengths": str, "calib_combine": str},
              _tca, sweep="tau"),
        Entry("streaming", "StreamingLLM: attention sinks + a recent window (constant KV)",
              {"sinks": int, "window": int, "block_size": int}, _dataclass_build("streaming.StreamingLLM"),
              Density("window", _lazy("streaming.window_for"))),
        Entry("full-budget", "the sparse path keeping every token (equals full attention; a test oracle)",
              {"window": int, "block_size": int}, _dataclass_build("full_budget.FullBudget")),
        Entry("xattention", "XAttention: block-sparse prefill, blocks by antidiagonal scores up to a mass threshold",
              {"threshold": float, "stride": int, "block_size": int}, _dataclass_build("xattention.XAttention"),
              sweep="threshold"),
        Entry("flexprefill", "FlexPrefill: per head query-aware or vertical-slash blocks (by a JS divergence) up to mass gamma",
              {"gamma": float, "tau": float, "min_budget": int, "block_size": int},
              _dataclass_build("flexprefill.FlexPrefill"), sweep="gamma"),
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
              _minference, sweep="scale"),
        Entry("blasst", "BLASST (skip-softmax): dense block prefill skipping key blocks whose max logit is far below "
              "the running max (lambda = threshold, or scale_factor / length; full KV)",
              {"scale_factor": float, "threshold": float, "block_size": int}, _dataclass_build("blasst.BLASST"),
              sweep="scale_factor"),
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
              _dataclass_build("token_sparse.TokenSparse"), sweep="keep"),
        Entry("spatten", "SpAtten cascade token pruning: cumulative attention importance, pruned tokens stay "
              "pruned in later layers (geometric schedule to `keep`)",
              {"keep": float, "start": float, "window": int, "block_size": int, "heads": float},
              _dataclass_build("spatten.SpAtten"),
              Density("keep", _lazy("spatten.keep_for"))),
        Entry("tokenselect", "TokenSelect: dense prefill, full cache; each decode step reads sinks + local + the top "
              "tokens per KV head by a soft vote of its query heads, reused while queries stay similar",
              {"budget": int, "sinks": int, "local": int, "threshold": float, "vote": str},
              _dataclass_build("tokenselect.TokenSelect"), Density("budget", _lazy("tokenselect.budget_for"))),
        Entry("tidaldecode", "TidalDecode: dense prefill, full cache; a token-selection layer (and a re-selection "
              "layer) picks the top-k tokens every later layer reads (position-persistent)",
              {"budget": int, "select_layer": int, "reselect_layer": int},
              _dataclass_build("tidaldecode.TidalDecode"), Density("budget", _lazy("tidaldecode.budget_for"))),
        Entry("recycled", "Recycled Attention: dense prefill, full cache; a full decode step every `stride` steps, "
              "in between the top-K tokens of the last full step's attention plus the new tokens",
              {"budget": int, "stride": int, "similarity": float},
              _dataclass_build("recycled.RecycledAttention"), Density("budget", _lazy("recycled.budget_for"))),
        Entry("zerotuning", "ZeroTuning (calibrator, stack with +): head-specific scaling of the initial token's "
              "attention, scales searched on calibration text", {"scale": float, "objective": str,
                                                                   "granularity": str, "length": int, "state": str},
              _calibrator("zerotuning", "one scale for every head with scale=<gamma>"), calibrator=True),
        Entry("act", "ACT (calibrator, stack with +): on heads filtered on calibration text, hidden attention sinks "
              "get beta x their attention, the rest redistributed",
              {"heads": str, "beta": float, "threshold": float, "queries": int, "max_sinks": int, "objective": str,
               "granularity": str, "length": int, "state": str},
              _calibrator("act", "every head with heads=all"), calibrator=True),
        Entry("moa", "MoA: per-head elastic sliding windows (sinks + alpha + beta*N recent tokens) from a "
              "gradient influence profile searched under a density budget",
              {"density": float, "sinks": int, "window": int, "block_size": int, "profile": str},
              _moa, Density("density", _lazy("moa.density_for"))),
        Entry("infiniretri", "InfiniRetri: reads the context in chunks, keeps the sentences the question's "
              "last-layer attention ranks highest (phrase-smoothed top-k), answers from them (eval only)",
              {"chunk": int, "topk": int, "phrase": int, "layer": int},
              _dataclass_build("infiniretri.InfiniRetri"), questions_only=True),
    )
}
COMPOSE = "+"  # base+calibrator


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


def questions_only(spec: str) -> bool:
    """Whether a spec's method (or its base, for 'base+calibrator') only answers questions about a
    context, so that a task without one (perplexity) does not apply to it."""
    base, _ = split(spec)
    return ENTRIES[parse_spec(base)[0]].questions_only


def calibrators() -> list[str]:
    return [e.name for e in ENTRIES.values() if e.calibrator]


def split(spec: str) -> tuple[str, str | None]:
    """A spec's (base part, calibrator part or None): 'tca:tau=0.7+zerotuning' -> ('tca:tau=0.7',
    'zerotuning'); a calibrator alone calibrates full attention: 'act' -> ('full', 'act')."""
    parts = [p.strip() for p in spec.strip().split(COMPOSE)]
    if not all(parts):
        raise ValueError(f"{spec!r}: a method is missing around {COMPOSE!r} (write method{COMPOSE}calibrator, "
                         f"e.g. tca{COMPOSE}zerotuning)")
    parts_of = [p.partition(":")[0].strip() for p in parts]
    for n in parts_of:
        if n not in ENTRIES:
            raise KeyError(f"unknown method {n!r}; known: {', '.join(names())} (see `tca methods`)")
    cal = calibrators()
    if len(parts) == 1:
        return (FULL, parts[0]) if parts_of[0] in cal else (parts[0], None)
    if len(parts) > 2:
        raise ValueError(f"{spec!r}: one calibrator stacks on one method (method{COMPOSE}calibrator)")
    if parts_of[0] in cal:
        raise ValueError(f"{spec!r}: {parts_of[0]} is an attention calibrator; it goes after the method it calibrates "
                         f"(e.g. {parts_of[1]}{COMPOSE}{parts_of[0]})" if parts_of[1] not in cal else
                         f"{spec!r}: two calibrators; stack one calibrator on a method (e.g. tca{COMPOSE}{parts_of[0]})")
    if parts_of[1] not in cal:
        raise ValueError(f"{spec!r}: {parts_of[1]} is not an attention calibrator ({', '.join(cal)} are); "
                         f"{COMPOSE!r} stacks one calibrator on a method")
    return parts[0], parts[1]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'name:key=value,key=value' -> (name, typed params); clear errors for anything unknown.
    One part of a spec (a composite 'a+b' is read with `split` first)."""
    if COMPOSE in spec:
        raise ValueError(f"{spec!r} stacks a calibrator on a method: read its parts with registry.split")
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
    """A spec's one written form: ' tca:score=observation, tau=0.70' -> 'tca:tau=0.7,score=observation';
    'act' -> 'full+act'."""
    base, cal = split(spec)
    return format_spec(*parse_spec(base)) + (COMPOSE + format_spec(*parse_spec(cal)) if cal else "")


def expand(spec: str) -> list[str]:
    """Value lists to specs, every combination in order: 'tca:tau=0.5|0.9,score=a|b' ->
    tca:tau=0.5,score=a; tca:tau=0.5,score=b; tca:tau=0.9,score=a; tca:tau=0.9,score=b.
    Each part of a composite expands alike."""
    if COMPOSE in spec:
        return [COMPOSE.join(combo) for combo in itertools.product(*(expand(p) for p in spec.split(COMPOSE)))]
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


def sweep_param(name: str) -> str | None:
    """The parameter a density sweep of method `name` varies: its density knob, else its declared
    sweep parameter (tca: tau, xattention: threshold, ...); None for a method with neither."""
    entry = ENTRIES[name]
    return entry.density.param if entry.density is not None else entry.sweep


def at_density(spec: str, kept_fraction: float, prompt_tokens: int) -> str:
    """`spec` with its density knob set to keep about kept_fraction of a prompt_tokens prompt (the
    base's knob, for a composite)."""
    base, cal = split(spec)
    if cal is not None:
        return at_density(base, kept_fraction, prompt_tokens) + COMPOSE + cal
    name, params = parse_spec(spec)
    param = density_param(name)
    if param in params:
        raise ValueError(f"{name}: {param} is set by the density match; leave it out of {spec!r}")
    value = ENTRIES[name].density.solve(kept_fraction, prompt_tokens, params)
    return format_spec(name, {**params, param: value})


def create(spec: str, *, model=None, tokenizer=None, **extra: Any):
    """Build the method a spec names. Keyword arguments beyond model/tokenizer go to the method
    as they are (objects a spec cannot spell, e.g. budgets=); for a composite `base+calibrator`, to
    the base (the calibrator is built from its spec: calibrated once per model, or state=<file>)."""
    base, cal = split(spec)
    if cal is not None:
        from .methods.compose import Calibrated

        cname, cparams = parse_spec(cal)
        return Calibrated(create(base, model=model, tokenizer=tokenizer, **extra),
                          ENTRIES[cname].build(cparams, model, tokenizer, {}))
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
        knob += "; stacks on a method: METHOD+" + e.name if e.calibrator else ""
        lines.append(f"{e.name:<{width}}  {e.summary}" + (f"  [{params}{knob}]" if params else ""))
    return "\n".join(lines)


def _check_params_match_fields() -> None:  # used by the tests: specs and dataclass fields agree
    """Every Entry built from a dataclass (`_dataclass_build`), or listed in STATE_BUILT with the spec
    parameters that name a state file (a path in a spec, a state object in the dataclass), takes
    exactly its dataclass's fields, with the same types."""
    for name, entry in ENTRIES.items():
        path, apart = getattr(entry.build, "cls_path", None), ()
        if name in STATE_BUILT:
            path, apart = STATE_BUILT[name]
        if path is None or name == FULL:  # tca: built from budgets; full: no spec parameters at all
            continue
        cls = _method_attr(path)
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("name", *apart)}
        assert set(entry.params) - set(apart) == fields, (name, fields)
        assert all(hints[k] is t for k, t in entry.params.items() if k not in apart), name
