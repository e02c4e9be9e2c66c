"""Method side of the suite: the only module that touches the core library.

Methods are the library's registry specs (`tca methods`; docs/eval.md), with two additions:
  NAME[:k=v,...]@match=REF   the method with its density knob (registry `Density`) set so that
                             it keeps the mean kept fraction REF measured at the same length
                             (the matched-KV comparison), e.g. streaming@match=tca:tau=0.9
  NAME[:k=v,...]@kept=F      the method with its density knob set to keep the fraction F of each
                             prompt (a fixed target, e.g. the leaderboard's matched fractions);
                             F may be a value list too: streaming@kept=0.25|0.4|0.6
  k=a|b|c                    a sweep: one method per value (every combination of the lists)
A method's label, naming its results, is its normalised spec (`registry.normalize`). On the
command line methods are separated by ';' (commas separate a spec's parameters).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .. import registry
from ..registry import DEFAULT_METHOD, PAPER_METHOD
from .schema import Sample

log = logging.getLogger(__name__)
SEPARATOR = ";"  # between methods on the command line
MATCH = "@match="
KEPT = "@kept="
# full attention, TCA's default configuration and the paper's rule at the calibrated tau, and
# StreamingLLM at the default's KV (a small block lets its window match a budget to 8 tokens: its
# kept tokens move in steps of the block size)
DEFAULT_METHODS = ("full", DEFAULT_METHOD, PAPER_METHOD, f"streaming:block_size=16{MATCH}{DEFAULT_METHOD}")


@dataclass(frozen=True)
class EvalMethod:
    """One method of a run. label: the normalised spec naming its results; spec: the registry
    spec it runs (a matched method's without its knob); match: the label whose measured kept
    fraction sets the knob; kept: a fixed kept fraction that sets it (neither: the spec runs as
    it is)."""

    label: str
    spec: str
    match: str | None = None
    kept: float | None = None

    @property
    def matched(self) -> bool:
        """Whether the density knob is set at run time (by `match` or `kept`)."""
        return self.match is not None or self.kept is not None


def split_methods(text: str) -> list[str]:
    """'full; tca:tau=0.7' -> ['full', 'tca:tau=0.7']."""
    return [t.strip() for t in text.split(SEPARATOR) if t.strip()]


def expand_method(text: str) -> list[EvalMethod]:
    """One method of the command line (sweeps expanded), with clear errors."""
    try:
        if text.strip().endswith(KEPT[:-1]):
            raise ValueError(f"{KEPT[:-1]} needs a fraction: NAME{KEPT}F (`tca leaderboard` fills in its --targets)")
        if KEPT in text:
            left, _, values = text.strip().partition(KEPT)
            if MATCH in values or MATCH in left:
                raise ValueError(f"{MATCH[:-1]} and {KEPT[:-1]} exclude each other")
            fractions = [_fraction(v) for v in values.split("|")]
            return [_method(one, None, f) for one in registry.expand(left) for f in fractions]
        left, sep, ref = text.strip().partition(MATCH)
        refs: list[str | None] = list(registry.expand(ref)) if sep else [None]
        return [_method(one, r) for one in registry.expand(left) for r in refs]
    except (KeyError, ValueError) as e:
        msg = str(e.args[0]) if e.args else str(e)
        comma_list = "," in text.partition(":")[0] or "should be key=value" in msg
        hint = f" (separate methods with {SEPARATOR!r})" if comma_list else ""
        raise ValueError(f"method {text!r}: {msg}{hint}") from None


def _fraction(text: str) -> float:
    """A kept fraction of @kept=, in (0, 1]."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{KEPT}{text.strip()!r}: a kept fraction is a number in (0, 1]") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{KEPT}{text.strip()}: a kept fraction is a number in (0, 1]")
    return value


def _method(spec: str, ref: str | None, kept: float | None = None) -> EvalMethod:
    name, params = registry.parse_spec(registry.split(spec)[0])  # the base (of a composite base+calibrator)
    spec = registry.normalize(spec)
    if ref is None and kept is None:
        return EvalMethod(spec, spec)
    knob = registry.density_param(name)
    if knob in params:
        raise ValueError(f"{name}: {knob} is set by {(MATCH if kept is None else KEPT)[:-1]}; leave it out")
    if kept is not None:
        return EvalMethod(f"{spec}{KEPT}{kept!r}", spec, kept=kept)
    if MATCH in ref:
        raise ValueError(f"the reference of {MATCH[:-1]} is a plain spec, not itself matched: {ref!r}")
    match = registry.normalize(ref)
    return EvalMethod(f"{spec}{MATCH}{match}", spec, match)


@dataclass(frozen=True)
class Outcome:
    """What one method run on one prompt gave back."""

    prediction: str
    nll: float | None
    kept_fraction: float
    kv_bytes: int
    dense_kv_bytes: int
    seconds: float
    extra: dict[str, Any]


class Backend(Protocol):
    """Runs one method on one prompt. The runner never sees the model or the core API."""

    model_name: str

    def load(self) -> Any:
        """Return the tokenizer (loading what is needed for it)."""

    def prepare(self, run_dir: Path) -> None: ...

    def run(self, method: EvalMethod, sample: Sample, ids: list[int], matched_fraction: float | None) -> Outcome:
        """matched_fraction: for a @match method the mean kept fraction of its reference at this
        length, for a @kept method its fixed fraction (None otherwise)."""

    # optional: run_batch(method, samples, ids_list, matched_fraction) -> list[Outcome], used when
    # the run's batch size is above 1 (samples of one task and length, left-padded together)


def resolve_tca_config(preset: str, score: str | None, tau: float) -> dict[str, Any]:
    """The TCA configuration a run uses, as plain data (for the run's identity)."""
    from dataclasses import asdict

    from ..methods.tca.config import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown TCA preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[preset].with_(tau=tau)
    return asdict(cfg.with_(score=score) if score else cfg)


SDPA_BACKENDS = ("auto", "math", "efficient_attention", "flash_attention", "cudnn_attention")


def sdpa_kernels(name: str) -> Any:
    """A context that restricts torch's SDPA to one kernel (nullcontext for 'auto')."""
    import contextlib

    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name.upper())])


class ModelBackend:
    """A real model run through `tca_attention.integration.enable` for every method."""

    def __init__(self, model_name: str, device: str = "cpu", dtype: str | None = None,
                 tca_preset: str = "small-context", tca_score: str | None = None,
                 tca_tau: float = 0.9, calibration_length: int | None = None, backend: str = "auto",
                 model: Any = None, tokenizer: Any = None, tca_config: Any = None,
                 budgets_path: Path | None = None, sdpa_backend: str = "auto", cuda_graph: bool = False,
                 sliding_kernel: bool = False) -> None:
        """model/tokenizer: an already loaded pair (skips load_model); tca_config: a TCAConfig
        used instead of preset/score/tau; budgets_path: an existing budget file of this model
        (copied into the run folder) instead of calibrating; sdpa_backend: the torch SDPA kernel
        for the layers transformers runs itself (see SDPA_BACKENDS); cuda_graph: decode the
        sparse methods that support it with the static steps of `session.generate(cuda_graph=True)`
        (captured in CUDA graphs on a GPU, run eagerly on the CPU; the same greedy tokens as
        `model.generate()`, each row cut at its first EOS), the others with `model.generate()`;
        sliding_kernel: the model's sliding-window layers' prompts through the engine's windowed
        kernel (`enable(sliding_kernel=True)`), for every method."""
        self.model_name = model_name
        self.device = device
        self.dtype = dtype
        self.tca_preset = tca_preset
        self.tca_score = tca_score
        self.tca_tau = tca_tau
        self.calibration_length = calibration_length
        self.backend = backend
        self._plan_budgets: dict[Any, Any] = {}  # TCA budgets per calibration set (tca:calib_*)
        self.model: Any = model
        self.tokenizer: Any = tokenizer
        self._tca_config = tca_config
        self.budgets_path = budgets_path
        self.sdpa_backend = sdpa_backend
        self.cuda_graph = cuda_graph
        self.sliding_kernel = sliding_kernel
        self.budgets: Any = None

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> Any:
        """Load the model; returns its tokenizer (generators need it before the model runs)."""
        if self.model is None:
            import torch

            from ..models import load_model

            dtype = getattr(torch, self.dtype) if self.dtype else None
            t0 = time.perf_counter()
            self.model, self.tokenizer = load_model(self.model_name, dtype=dtype, device=self.device)
            log.info("loaded %s on %s in %.1f s", self.model_name, self.device, time.perf_counter() - t0)
        return self.tokenizer

    def tca_config(self) -> Any:
        if self._tca_config is not None:
            return self._tca_config
        from ..methods.tca.config import TCAConfig

        return TCAConfig(**resolve_tca_config(self.tca_preset, self.tca_score, self.tca_tau))

    def _checked(self, budgets: Any, source: Path) -> Any:
        """Budgets re-selected at this run's tau/score; an error if calibrated otherwise."""
        want = self.tca_config()
        fixed = ("block_size", "window", "alpha", "sigma", "sink_tokens")
        diff = {f: (getattr(budgets.config, f), getattr(want, f)) for f in fixed
                if getattr(budgets.config, f) != getattr(want, f)}
        if diff:
            raise ValueError(f"budgets {source} were calibrated with other settings (have, want): {diff}")
        return budgets.at(tau=want.tau, score=want.score)

    def prepare(self, run_dir: Path) -> None:
        """Load the model and the TCA budgets: the run folder's copy, a given file, or the core's
        per-model cache (calibrating once); a copy is saved in the run folder."""
        self.load()
        from ..methods.tca.budgets import Budgets
        from ..integration.probe import load_or_calibrate

        path = run_dir / "budgets.json"
        if path.exists():
            self.budgets = self._checked(Budgets.load(path, model=self.model), path)
            log.info("reusing budgets %s", path)
            return
        if self.budgets_path is not None:
            self.budgets = self._checked(Budgets.load(self.budgets_path, model=self.model), self.budgets_path)
            self.budgets.save(path)
            log.info("using budgets %s (copied to %s)", self.budgets_path, path)
            return
        t0 = time.perf_counter()
        # the core's per-model budget cache: a model is calibrated once for every run folder
        self.budgets = load_or_calibrate(self.model, self.tokenizer, self.model_name, self.tca_config(),
                                         length=self.calibration_length)
        self.budgets.save(path)
        log.info("budgets of %s ready in %.1f s (mean kept fraction %.3f, %d dense heads) -> %s",
                 self.model_name, time.perf_counter() - t0, self.budgets.mean_kept_fraction,
                 self.budgets.dense_heads, path)

    # -- methods ------------------------------------------------------------------------------
    def core_method(self, method: EvalMethod, prompt_tokens: int, matched_fraction: float | None) -> tuple[Any, dict[str, Any]]:
        """The registry's method for `method` (a matched one's knob set for prompt_tokens), and
        what the results record about it (a matched method's knob value). The run's TCA budgets
        go to every method that takes them (`tca`, at the spec's tau/score, never dense by the
        short-prompt policy unless the spec sets dense_below)."""
        spec, record = method.spec, {}
        if method.kept is not None:
            matched_fraction = method.kept
        if method.matched:
            if matched_fraction is None:
                raise RuntimeError(f"{method.label}: no finished {method.match} results at this length to match")
            spec = registry.at_density(spec, matched_fraction, prompt_tokens)
            name, params = registry.parse_spec(registry.split(spec)[0])
            knob = registry.density_param(name)
            record[knob] = params[knob]
        base, calibrator = registry.split(spec)
        name, params = registry.parse_spec(base)  # the base gets the run's budgets
        prepared: dict[str, Any] = {}
        if name == "tca":  # the run's budgets; accuracy is of the selection, not the short-prompt policy
            budgets = self.budgets
            calib = {k: params.pop(k) for k in registry.CALIBRATION_PARAMS if k in params}
            if calib:  # a calibration set of its own (cached per model and setting), then the spec without it
                budgets = self._calibration_set_budgets(registry.calibration_set(calib))
                spec = registry.format_spec(name, params) + (f"{registry.COMPOSE}{calibrator}" if calibrator else "")
            prepared = {"budgets": budgets, **({} if "dense_below" in params else {"dense_below": 0})}
        return registry.create(spec, model=self.model, tokenizer=self.tokenizer, **prepared), record

    def _calibration_set_budgets(self, plan: Any) -> Any:
        """TCA budgets calibrated with `plan` (a CalibrationSet) under the run's config, once per
        setting (the core's cache, then memoised here)."""
        from ..integration.probe import load_or_calibrate

        if plan not in self._plan_budgets:
            self._plan_budgets[plan] = self._checked(
                load_or_calibrate(self.model, self.tokenizer, self.model_name, self.tca_config(),
                                  length=self.calibration_length, plan=plan), f"for {plan}")
        return self._plan_budgets[plan]

    def run(self, method: EvalMethod, sample: Sample, ids: list[int], matched_fraction: float | None) -> Outcome:
        """One sample: a batch of one (no padding, so exactly the method's own semantics)."""
        return self.run_batch(method, [sample], [ids], matched_fraction)[0]

    def run_batch(self, method: EvalMethod, samples: list[Sample], ids_list: list[list[int]],
                  matched_fraction: float | None) -> list[Outcome]:
        """Several samples of one task at once, left-padded into one batch.

        Per-row results match single runs for full attention (up to kernel rounding); for TCA
        each row's blocks start at its own first token (same selection as alone, up to rounding). A
        matched method's knob is set for the batch's mean prompt length. Seconds are the batch's / rows.
        """
        import torch

        from ..integration import enable

        kinds = {s.kind for s in samples}
        if len(kinds) != 1:
            raise ValueError(f"a batch mixes sample kinds {kinds}")
        prompt_lens = [len(ids) for ids in ids_list]
        B = len(samples)
        core, record = self.core_method(method, round(sum(prompt_lens) / B), matched_fraction)
        extra: dict[str, Any] = {"batch": B, **record}
        t0 = time.perf_counter()
        retrieved = None
        if getattr(core, "reads_in_chunks", False):  # InfiniRetri: a shorter prompt, then dense attention
            ids_list, retrieved = self._read_in_chunks(core, samples, ids_list)
            from ..methods.dense import Dense

            core = Dense()
        lens = [len(ids) for ids in ids_list]
        L = max(lens)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        input_ids = torch.full((B, L), int(pad), dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for r, ids in enumerate(ids_list):
            input_ids[r, L - len(ids):] = torch.tensor(ids)
            attn[r, L - len(ids):] = 1
        input_ids, attn = input_ids.to(self.model.device), attn.to(self.model.device)
        with enable(self.model, core, backend=self.backend, sliding_kernel=self.sliding_kernel) as session, \
                torch.no_grad(), sdpa_kernels(self.sdpa_backend):
            cache = session.new_cache()
            nlls: list[float | None] = [None] * B
            preds = [""] * B
            if samples[0].kind == "nll":
                ns = [int(s.metadata["nll_tokens"]) for s in samples]
                K = max(ns) + 1
                out = self.model(input_ids, attention_mask=attn, use_cache=True, logits_to_keep=K,
                                 **session.cache_kwargs(cache))
                for r, n in enumerate(ns):
                    logits = out.logits[r, K - 1 - n: K - 1].float()
                    nlls[r] = float(torch.nn.functional.cross_entropy(logits, input_ids[r, -n:]))
            else:
                limits = [s.max_new_tokens for s in samples]
                gen = None
                if self.cuda_graph and not core.is_dense and core.supports_static_decode():
                    try:
                        gen = session.generate(input_ids, attention_mask=attn, max_new_tokens=max(limits),
                                               cuda_graph=True)
                        cache = session.cache  # the static cache of that run
                        extra["decode"] = "static" + ("+graph" if session.last_run.graphs else "")
                    except Exception as e:  # noqa: BLE001 - recorded and redone the plain way, never lost
                        log.warning("%s: static decode failed (%s: %s); decoding with generate()", method.label,
                                    type(e).__name__, e)
                        extra["static_decode_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
                        cache = session.new_cache()
                if gen is None:
                    gen = self.model.generate(
                        input_ids, attention_mask=attn, max_new_tokens=max(limits), **session.cache_kwargs(cache),
                        do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=int(pad),
                    )
                # greedy decoding is causal: a row's first n tokens do not depend on later ones
                stops = _eos_ids(self.model)
                preds = [self.tokenizer.decode(_until(gen[r, L:L + limits[r]].tolist(), stops), skip_special_tokens=True)
                         for r in range(B)]
            if input_ids.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / B
            report = session.prefill_report() if not core.is_dense else {}
        if retrieved is not None:  # the KV held is the retained prompt's; dense is the whole prompt's
            rows = _dense_rows(cache, lens, L)
            for r, info in enumerate(retrieved):
                rows[r]["kept_fraction"] = lens[r] / prompt_lens[r]
                rows[r]["dense_kv_bytes"] = int(rows[r]["kv_bytes"] * prompt_lens[r] / lens[r])
            extra["prefill_kept_fraction"] = sum(lens) / sum(prompt_lens)
        elif core.is_dense:
            rows = _dense_rows(cache, lens, L)
        else:
            rows = cache.per_row()
            extra["prefill_kept_fraction"] = report.get("kept_fraction")  # batch means
            extra["retained"] = report.get("retained")  # the quality certificate (engine/certificate.py)
            extra["retained_min"] = report.get("retained_min")
            extra["error_bound"] = report.get("error_bound")
            # a decode-time selection reads less than the cache keeps (None: it reads everything)
            extra["decode_attended_fraction"] = report.get("decode_kept_fraction")
            dense_at = getattr(core, "dense_at", ())
            if dense_at:  # TCA's dense layers (dense_at=auto: the layer probe's choice)
                extra["dense_at"] = list(dense_at)
        return [Outcome(preds[r], nlls[r], float(rows[r]["kept_fraction"]), int(rows[r]["kv_bytes"]),
                        int(rows[r]["dense_kv_bytes"]), seconds,
                        dict(extra) | ({"retrieval": retrieved[r]} if retrieved else {})) for r in range(B)]

    def _read_in_chunks(self, core: Any, samples: list[Sample], ids_list: list[list[int]]
                        ) -> tuple[list[list[int]], list[dict[str, Any]]]:
        """InfiniRetri's prompts: each sample's context tokens (found in its prompt) read in chunks and
        replaced by the sentences retained (methods/infiniretri.py); the rest of the prompt is kept."""
        from ..integration.probe import ModelProbe
        from ..methods import infiniretri as ir

        probe, tok, out, infos = ModelProbe(self.model), self.tokenizer, [], []
        for sample, ids in zip(samples, ids_list):
            if sample.kind != "generate" or not sample.question or not sample.context:
                raise ValueError(f"{core.name} answers a question about a context: sample {sample.id} has no "
                                 "question or context (perplexity samples cannot be read in chunks)")
            c0, c1 = ir.locate(ids, _token_ids(tok, sample.context))
            q0, q1 = ir.locate(ids, _token_ids(tok, sample.question), start=c1)
            context = ids[c0:c1]
            ends = ir.sentence_ends(tok.batch_decode([[t] for t in context]))
            kept, info = ir.retain(probe, core, ids[:c0], context, ends, ids[c1:], (q0 - c1, q1 - c1))
            out.append(ids[:c0] + kept + ids[c1:])
            infos.append(info)
        return out, infos


def _eos_ids(model: Any) -> set[int]:
    """The token ids at which greedy generation stops (the model's generation config)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _until(tokens: list[int], stops: set[int]) -> list[int]:
    """tokens up to (without) the first stop token: what `model.generate()` returns for a row
    that stopped there (it pads the rest), and what a fixed-length static decode must be cut to."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in (ids.flatten().tolist() if hasattr(ids, "flatten") else ids)]


def _dense_rows(cache: Any, lens: list[int], padded: int) -> list[dict[str, float]]:
    """Per-row KV of a plain cache: full layers by the row's own tokens (the cache length less
    the row's padding), sliding layers shared equally."""
    rows = []
    B = len(lens)
    for n in lens:
        total = 0.0
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None:
                continue
            nbytes = (layer.keys.nbytes + layer.values.nbytes) / B
            held = layer.keys.shape[-2]
            total += nbytes if getattr(layer, "is_sliding", False) else nbytes * (held - (padded - n)) / held
        rows.append({"kept_fraction": 1.0, "kv_bytes": int(total), "dense_kv_bytes": int(total)})
    return rows
