"""Method side of the suite: the only module that touches the core library.

Method specs (strings on the command line):
  full                 plain attention (a no-op session, kept fraction 1.0)
  tca                  TCA at the calibrated tau;  tca@0.7  TCA re-selected at tau 0.7
  tca/column_mean      TCA with the other calibration score (also tca@0.95/column_mean);
                       the default score is the calibrated one
  streaming:1024       StreamingLLM, 4 sinks + a window of 1024 tokens
  streaming=tca@0.9    StreamingLLM whose kept tokens equal the mean kept tokens of the
                       method `tca@0.9` at the same target length (same KV budget)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .schema import Sample

log = logging.getLogger(__name__)
STREAMING_SINKS = 4
SCORES = ("observation", "column_mean")
# StreamingLLM's recent window ends on a block boundary of the core's geometry, so kept counts
# move in steps of its block size: a small block lets the window match a budget to 16 tokens.
STREAMING_BLOCK = 16


@dataclass(frozen=True)
class MethodSpec:
    label: str
    kind: str  # "full" | "tca" | "streaming"
    tau: float | None = None  # tca: None means the calibrated tau
    score: str | None = None  # tca: None means the calibrated score
    window: int | None = None  # streaming with a fixed window
    match: str | None = None  # streaming matched to the kept fraction of this label


def parse_method(text: str) -> MethodSpec:
    text = text.strip()
    if text == "full":
        return MethodSpec("full", "full")
    if text == "tca" or text.startswith(("tca@", "tca/")):
        head, _, score = text.partition("/")
        if score and score not in SCORES:
            raise ValueError(f"unknown TCA score {score!r} in {text!r}; known: {', '.join(SCORES)}")
        tau = None
        if head != "tca":
            tau = float(head[4:])
            if not 0.0 < tau <= 1.0:
                raise ValueError(f"tau must be in (0, 1]: {text!r}")
        label = "tca" + (f"@{tau:g}" if tau is not None else "") + (f"/{score}" if score else "")
        return MethodSpec(label, "tca", tau=tau, score=score or None)
    if text.startswith("streaming="):
        ref = parse_method(text[len("streaming="):])
        if ref.kind != "tca":
            raise ValueError(f"streaming can only be matched to a tca method: {text!r}")
        return MethodSpec(f"streaming={ref.label}", "streaming", match=ref.label)
    if text.startswith("streaming:"):
        window = int(text[len("streaming:"):])
        if window < 1:
            raise ValueError(f"streaming window must be >= 1: {text!r}")
        return MethodSpec(f"streaming:{window}", "streaming", window=window)
    raise ValueError(
        f"unknown method {text!r}; use full, tca, tca@TAU, tca@TAU/SCORE, streaming:WINDOW or streaming=tca@TAU"
    )


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

    def run(self, spec: MethodSpec, sample: Sample, ids: list[int], matched_fraction: float | None) -> Outcome: ...

    # optional: run_batch(spec, samples, ids_list, matched_fraction) -> list[Outcome], used when
    # the run's batch size is above 1 (samples of one task and length, left-padded together)


def resolve_tca_config(preset: str, score: str | None, tau: float) -> dict[str, Any]:
    """The TCA configuration a run uses, as plain data (for the run's identity)."""
    from dataclasses import asdict

    from ..methods.tca.config import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown TCA preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[preset].with_(tau=tau)
    return asdict(cfg.with_(score=score) if score else cfg)


def streaming_window(target_tokens: float, prompt_tokens: int, block_size: int, sinks: int = STREAMING_SINKS) -> int:
    """The window whose StreamingLLM cache holds about `target_tokens` after prefill.

    The core keeps sinks + the local region, which is the window plus the part of the prompt
    that does not fill a whole block: sinks + w + (L - w) mod b, so the match is within b / 2.
    """
    best_w, best_err = 1, math.inf
    hi = max(1, int(round(target_tokens)) - sinks)
    for w in range(max(1, hi - block_size), hi + 1):
        kept = sinks + w + (prompt_tokens - w) % block_size if prompt_tokens > w + block_size else prompt_tokens
        if abs(kept - target_tokens) < best_err:
            best_w, best_err = w, abs(kept - target_tokens)
    return best_w


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
                 budgets_path: Path | None = None, sdpa_backend: str = "auto") -> None:
        """model/tokenizer: an already loaded pair (skips load_model); tca_config: a TCAConfig
        used instead of preset/score/tau; budgets_path: an existing budget file of this model
        (copied into the run folder) instead of calibrating; sdpa_backend: the torch SDPA kernel
        for the layers transformers runs itself (see SDPA_BACKENDS)."""
        self.model_name = model_name
        self.device = device
        self.dtype = dtype
        self.tca_preset = tca_preset
        self.tca_score = tca_score
        self.tca_tau = tca_tau
        self.calibration_length = calibration_length
        self.backend = backend
        self.model: Any = model
        self.tokenizer: Any = tokenizer
        self._tca_config = tca_config
        self.budgets_path = budgets_path
        self.sdpa_backend = sdpa_backend
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
    def core_method(self, spec: MethodSpec, prompt_tokens: int, matched_fraction: float | None) -> Any:
        from .. import registry

        if spec.kind == "full":
            return registry.create("full")
        if spec.kind == "tca":
            changes = {k: v for k, v in (("tau", spec.tau), ("score", spec.score)) if v is not None}
            budgets = self.budgets.at(**changes) if changes else self.budgets
            return registry.create("tca", budgets=budgets)
        block = STREAMING_BLOCK
        if spec.match is not None:
            if matched_fraction is None:
                raise RuntimeError(f"{spec.label}: no finished {spec.match} results at this length to match")
            window = streaming_window(matched_fraction * prompt_tokens, prompt_tokens, block)
        else:
            assert spec.window is not None
            window = spec.window
        return registry.create("streaming", sinks=STREAMING_SINKS, window=window, block_size=block)

    def run(self, spec: MethodSpec, sample: Sample, ids: list[int], matched_fraction: float | None) -> Outcome:
        """One sample: a batch of one (no padding, so exactly the method's own semantics)."""
        return self.run_batch(spec, [sample], [ids], matched_fraction)[0]

    def run_batch(self, spec: MethodSpec, samples: list[Sample], ids_list: list[list[int]],
                  matched_fraction: float | None) -> list[Outcome]:
        """Several samples of one task at once, left-padded into one batch.

        Per-row results match single runs for full attention (up to kernel rounding); for TCA
        the block grid starts at the batch's first position, so a row with p padding tokens
        sees its blocks shifted by p (< 1% of the prompt for same-length samples). StreamingLLM
        matched to a budget uses the batch's mean prompt length. Seconds are the batch's / rows.
        """
        import torch

        from ..integration import enable

        kinds = {s.kind for s in samples}
        if len(kinds) != 1:
            raise ValueError(f"a batch mixes sample kinds {kinds}")
        lens = [len(ids) for ids in ids_list]
        L, B = max(lens), len(samples)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        input_ids = torch.full((B, L), int(pad), dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for r, ids in enumerate(ids_list):
            input_ids[r, L - len(ids):] = torch.tensor(ids)
            attn[r, L - len(ids):] = 1
        input_ids, attn = input_ids.to(self.model.device), attn.to(self.model.device)
        method = self.core_method(spec, round(sum(lens) / B), matched_fraction)
        extra: dict[str, Any] = {"batch": B}
        if spec.kind == "streaming":
            extra["window"] = method.window
        t0 = time.perf_counter()
        with enable(self.model, method, backend=self.backend) as session, torch.no_grad(), sdpa_kernels(self.sdpa_backend):
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
                gen = self.model.generate(
                    input_ids, attention_mask=attn, max_new_tokens=max(limits), **session.cache_kwargs(cache),
                    do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=int(pad),
                )
                # greedy decoding is causal: a row's first n tokens do not depend on later ones
                preds = [self.tokenizer.decode(gen[r, L:L + limits[r]], skip_special_tokens=True) for r in range(B)]
            if input_ids.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / B
            report = session.prefill_report() if not method.is_dense else {}
        if method.is_dense:
            rows = _dense_rows(cache, lens, L)
        else:
            rows = cache.per_row()
            extra["prefill_kept_fraction"] = report.get("kept_fraction")  # batch means
            extra["retained"] = report.get("retained")
        return [Outcome(preds[r], nlls[r], float(rows[r]["kept_fraction"]), int(rows[r]["kv_bytes"]),
                        int(rows[r]["dense_kv_bytes"]), seconds, dict(extra)) for r in range(B)]


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
