"""RazorAttention (Tang et al., ICLR 2025): retrieval heads keep the whole cache; the other heads keep
attention sinks and a recent window plus one compensation token holding what they dropped.

Retrieval heads are echo heads and induction heads, found once per model from a probe: a sequence
of random tokens repeated a few times. For a query in a repetition, its echo score is the attention
it puts on the earlier occurrences of its own token (positions j - r * period), its induction score
the attention on the tokens that followed them (j - r * period + 1). A query head's scores are
averaged over such queries and probes; a KV head's are the max over its query heads (one retrieving
query head needs the KV head's whole cache). The `echo_fraction` of KV heads with the highest echo
scores, then the best induction scores up to `retrieval_fraction` of all KV heads, are retrieval heads.

Prefill is plain attention (the paper compresses the cache, not the prompt's attention:
TokenPlan.attend_all). After it, a non-retrieval head keeps its first `sinks` tokens and the
engine's local region, and the real tokens it drops become one compensation entry: their mean key
and mean value, weighted by their count n (TokenPlan.compensate; the engine gives it a logit bias
log n, so it stands for n copies of the mean token). In decode, each block the ragged cache
compresses is folded into the entry too. Retrieval heads keep every token.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from ..engine.plan import TokenPlan
from ..introspect import layer_kinds, text_config
from .base import Method, Probe, local_geometry
from .head_kinds import Kind, as_kinds, kinds_decode_keep, kinds_plan
from .head_kinds import retrieval_fraction_for as _solve
from .state import announce as say
from .state import ModelIdentity, StateError, check_header, layer_rows, per_head, save_json, unit_scores

FORMAT = "tca-attention/razor-scores"
FORMAT_VERSION = 1


# -- the echo and induction scores -----------------------------------------------------------------
def echo_induction(q: torch.Tensor, k: torch.Tensor, scaling: float, period: int,
                   n_queries: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction score of every query head on a sequence repeating every `period` tokens.

    q (H, L, D), k (KV, L, D) after rotary. Over up to n_queries queries j >= period (spread evenly):
    echo = attention mass on keys j - r * period (r >= 1), induction = on keys j - r * period + 1.
    -> (echo (H,), induction (H,)) float64 in [0, 1].
    """
    H, L, D = q.shape
    KV = k.shape[0]
    g = H // KV
    if L <= period:
        raise ValueError(f"a probe of {L} tokens has no repetition of period {period}")
    j = torch.linspace(period, L - 1, min(n_queries, L - period), device=q.device).round().long().unique()
    Q = j.numel()
    qs = q[:, j].float().reshape(KV, g * Q, D)  # (KV, g*Q, D): query head h = kv * g + i
    logits = (qs @ k.float().transpose(1, 2)).view(H, Q, L) * scaling  # (H, Q, L)
    key = torch.arange(L, device=q.device)[None, :]
    probs = torch.softmax(logits.masked_fill(key[None] > j[None, :, None], float("-inf")), -1)
    back = j[:, None] - key  # (Q, L) distance to each key
    earlier = (back > 0) & (back % period == 0)  # earlier occurrences of the query's token
    after = (back >= period - 1) & ((back + 1) % period == 0)  # the token after each of them
    echo = (probs * earlier[None]).sum(-1).mean(-1)
    induction = (probs * after[None]).sum(-1).mean(-1)
    return echo.double().cpu(), induction.double().cpu()


# -- the state ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RazorScores:
    """Echo and induction score of every KV head: echo[i] / induction[i] None for layers left alone
    (sliding-window layers), else one score in [0, 1] per KV head."""

    model: ModelIdentity
    echo: tuple[tuple[float, ...] | None, ...]
    induction: tuple[tuple[float, ...] | None, ...]
    calibration: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def retrieval_heads(self, fraction: float, echo_fraction: float) -> tuple[tuple[bool, ...] | None, ...]:
        """Per layer, which KV heads are retrieval heads: of the N scored heads, the round(echo_fraction
        * N) best echo heads, then the best induction heads up to round(fraction * N) in all (ties:
        lower layer and head first)."""
        heads = [(i, h) for i, row in enumerate(self.echo) if row is not None for h in range(len(row))]
        n_all = math.floor(fraction * len(heads) + 0.5)
        n_echo = min(math.floor(echo_fraction * len(heads) + 0.5), n_all)
        by_echo = sorted(heads, key=lambda x: (-self.echo[x[0]][x[1]], x))
        chosen = set(by_echo[:n_echo])
        by_induction = sorted((x for x in heads if x not in chosen), key=lambda x: (-self.induction[x[0]][x[1]], x))
        chosen |= set(by_induction[: n_all - n_echo])
        return tuple(None if row is None else tuple((i, h) in chosen for h in range(len(row)))
                     for i, row in enumerate(self.echo))

    def check_model(self, model) -> None:
        why = self.model.mismatch(ModelIdentity.of(model))
        if why:
            raise StateError(f"razor scores for {self.model.name or self.model.model_type} do not fit this model: {why}")

    def to_json(self) -> dict[str, Any]:
        def rows(x):
            return [None if r is None else list(r) for r in x]

        return {"format": FORMAT, "version": FORMAT_VERSION, "model": asdict(self.model),
                "calibration": self.calibration, "echo": rows(self.echo), "induction": rows(self.induction)}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_json(), path)

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> "RazorScores":
        where = f" {source}" if source else ""

        def bad(why: str) -> StateError:
            return StateError(f"corrupt razor score file{where}: {why}")

        check_header(data, FORMAT, FORMAT_VERSION, "razor score file", source)
        model = ModelIdentity.from_json(data.get("model"), bad)
        calib = data.get("calibration", {})
        if not isinstance(calib, dict):
            raise bad("calibration must be an object")

        def rows(what: str) -> tuple[tuple[float, ...] | None, ...]:
            value = layer_rows(data.get(what), what, model.num_layers, model.num_kv_heads, unit_scores,
                               "scores in [0, 1]", bad)
            return tuple(None if r is None else tuple(float(x) for x in r) for r in value)

        echo, induction = rows("echo"), rows("induction")
        if [r is None for r in echo] != [r is None for r in induction]:
            raise bad("echo and induction must score the same layers")
        return cls(model, echo, induction, calib)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "RazorScores":
        """Load a razor score file; with `model`, refuse scores calibrated on another model."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
            raise StateError(f"corrupt razor score file {path}: {e}") from e
        scores = cls.from_json(data, source=str(path))
        if model is not None:
            scores.check_model(model)
        return scores


# -- calibration -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probing:
    """The probe: `samples` sequences of `period` random tokens repeated `repeats` times."""

    period: int = 256
    repeats: int = 4
    samples: int = 4
    seed: int = 0


def random_repeats(vocab_size: int, probing: Probing, sample: int) -> list[int]:
    """One probe: `period` random token ids (no special-token filtering) repeated."""
    rng = random.Random(probing.seed * 100003 + sample)
    base = [rng.randrange(vocab_size) for _ in range(probing.period)]
    return base * probing.repeats


def calibrate_razor_scores(probe: Probe, probing: Probing = Probing(), progress: bool = True) -> RazorScores:
    """Echo and induction score of every KV head of the probe's model (see the module docstring)."""
    model = probe.model
    kinds = layer_kinds(model)
    cfg = text_config(model)
    n_kv = cfg.num_key_value_heads
    device = next(model.parameters()).device
    sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    t0 = time.perf_counter()
    for s in tqdm(range(probing.samples), desc="razor calibration", disable=not progress):
        ids = random_repeats(cfg.vocab_size, probing, s)

        def observe(idx, q, k, v, scaling):
            e, i = echo_induction(q[0], k[0], scaling, probing.period)
            e0, i0 = sums.get(idx, (0, 0))
            sums[idx] = (e0 + e, i0 + i)

        probe.observe(torch.tensor([ids], device=device), observe)

    def per_kv(j: int):
        return tuple(None if kinds[i] != "full" else
                     tuple(float(x) for x in (sums[i][j] / probing.samples).view(n_kv, -1).amax(-1).clamp(0, 1))
                     for i in range(len(kinds)))

    return RazorScores(ModelIdentity.of(model), per_kv(0), per_kv(1), {
        **asdict(probing), "gqa": "max over query heads", "seconds": round(time.perf_counter() - t0, 2)})


def scores_path_for(model, model_key: str, probing: Probing) -> Path:
    """Where the razor scores of this model and probe are cached (under paths.cache_root())."""
    from ..paths import cache_root

    ident = {k: v for k, v in asdict(ModelIdentity.of(model)).items() if k != "name"}
    digest = hashlib.sha256(json.dumps([model_key, ident, asdict(probing), FORMAT_VERSION], sort_keys=True)
                            .encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key).name) or "model"
    return cache_root() / "razor_scores" / f"{safe}-{digest}.json"


def load_or_calibrate(probe: Probe, model_key: str, probing: Probing = Probing(), announce: bool = True) -> RazorScores:
    """Razor scores from the per-model cache, calibrating once if needed (announced on stderr)."""
    model = probe.model
    path = scores_path_for(model, model_key, probing)
    if path.exists():
        say(announce, f"Using cached razor scores {path} (delete the file to calibrate again).", once=path)
        return RazorScores.load(path, model=model)
    say(announce, f"Calibrating RazorAttention ONCE for this model: {probing.samples} dense forwards of "
                      f"{probing.period} random tokens x {probing.repeats}; the scores will be cached in {path}.")
    scores = calibrate_razor_scores(probe, probing, progress=announce)
    scores.save(path)
    say(announce, f"Razor scores saved to {path}.")
    return scores


# -- the method --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Razor(Method):
    """Retrieval heads (echo + induction) keep everything; the others sinks + window + one
    compensation token (compensate=False: without it, an ablation)."""

    scores: RazorScores
    retrieval_fraction: float = 0.15
    echo_fraction: float = 0.01
    sinks: int = 4
    window: int = 256
    block_size: int = 64
    compensate: bool = True
    name: str = "razor"
    _kinds: tuple = per_head("kv", default=(), init=False, repr=False, compare=False)  # a TP rank keeps its heads' kinds

    def __post_init__(self) -> None:
        for what in ("retrieval_fraction", "echo_fraction"):
            if not 0.0 <= getattr(self, what) <= 1.0:
                raise ValueError(f"{what} must be in [0, 1], got {getattr(self, what)}")
        if self.sinks < 0 or self.window < 1 or self.block_size < 1:
            raise ValueError("razor needs sinks >= 0, window >= 1, block_size >= 1")
        object.__setattr__(self, "_kinds", as_kinds(self.scores.retrieval_heads(self.retrieval_fraction,
                                                                                self.echo_fraction)))

    def kinds(self, layer_idx: int) -> tuple[Kind, ...] | None:
        return self._kinds[layer_idx]

    def check_model(self, model) -> None:
        self.scores.check_model(model)

    def supports_static_decode(self) -> bool:
        return False  # the static cache has no compensation entries

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return kinds_decode_keep(self.kinds(layer_idx) or ("dense",) * num_kv_heads, self.block_size)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True):
        kinds = self.kinds(layer_idx)
        if kinds is None:
            return None
        if all(kd == "dense" for kd in kinds):
            return None
        plan = kinds_plan(kinds, k, key_start, sinks=self.sinks, window=self.window, block_size=self.block_size,
                          padded=padded)
        if plan is None:  # a short prompt every head keeps whole: decode still folds what it drops
            plan = _keep_all(k, key_start, self.window, self.block_size, kinds_decode_keep(kinds, self.block_size),
                             padded)
        comp = torch.tensor([kd == "streaming" for kd in kinds], device=k.device) if self.compensate else None
        return dataclasses.replace(plan, compensate=comp, attend_all=True)

    def report(self) -> dict:
        rows = [r for r in self._kinds if r is not None]
        return {"retrieval_heads": sum(k == "dense" for r in rows for k in r), "kv_heads": sum(map(len, rows))}


def _keep_all(k: torch.Tensor, key_start: torch.Tensor, window: int, block_size: int, decode_keep: torch.Tensor,
              padded: bool) -> TokenPlan:
    """The TokenPlan keeping every token (an empty global region: everything is local), so that the
    cache still learns which heads compensate in decode."""
    B, KV = k.shape[:2]
    return TokenPlan(torch.zeros(B, KV, 0, dtype=torch.long, device=k.device),
                     torch.zeros(B, KV, dtype=torch.int32, device=k.device), 0, window, block_size, key_start,
                     decode_keep, kept_total=None if padded else 0,
                     row_local_start=key_start.long() if padded else None)


def retrieval_fraction_for(kept_fraction: float, seq_len: int, params: Mapping[str, Any]) -> float:
    """The retrieval fraction keeping about kept_fraction of a seq_len prompt (the density knob):
    head-split's solve, with one more slot per streaming head for its compensation token."""
    defaults = {f.name: f.default for f in fields(Razor) if f.name in ("sinks", "window", "block_size", "compensate")}
    p = {**defaults, **params}
    comp = p["compensate"] and local_geometry(seq_len, p["block_size"], p["window"]) is not None
    return _solve(kept_fraction, seq_len, p["sinks"] + int(comp), p["window"], p["block_size"])
