"""MoA (Fu et al., "Mixture of Attention Spans" / "MoA: Mixture of Sparse Attention", CoLM'25):
per-head elastic sliding windows.

Each KV head h keeps the first `sinks` tokens plus a recent band, its span (sinks included) being
S_h(N) = alpha_h + beta_h * N for a prompt of N tokens. The rules (alpha_h, beta_h) come from:

  profile   the paper's gradient-based attention influence: masking entry A_ij of a row-normalised
            attention row changes the loss by about dL_ij = -A_ij (g_ij - sum_k g_ik A_ik) / (1 - A_ij)
            (first-order Taylor, g = dL/dA). Summed into block x block tiles, averaged over the
            calibration samples, taken in absolute value; per head and profile length we keep
            tail[n], the influence of every tile at block distance >= n outside the sink column:
            what a band of n blocks loses.
  optimise  every head picks one rule of a grid (MoA's alpha x beta grid) minimising the summed
            influence lost over the profile lengths, under a density budget (mean kept fraction of
            the KV over heads) at each profile length and at an extension length. The paper solves a
            mixed-integer programme (Gurobi); we run a greedy multiple-choice-knapsack ascent
            (cheapest rules first, then the best loss reduction per unit of density), docs/methods.md.

On the engine a head's band is a TokenPlan with a per-head window (TokenPlan.head_window): the cache
keeps the sinks plus the last band tokens of each head, so the memory saving is real.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..engine.plan import TokenPlan, pack_mask
from ..introspect import layer_kinds, text_config
from .base import Method, Probe, global_region, local_geometry, row_geometry, sink_mask
from .state import ModelIdentity, StateError, check_header, json_type, per_head, save_json
from .state import announce as state_announce

log = logging.getLogger(__name__)

FORMAT = "tca-attention/moa-profile"
FORMAT_VERSION = 1
NUM_BETAS = 9  # the paper's beta grid: 0, 1/8, ..., 1
ALPHA_STEPS = 16  # alpha grid: [-min length, max profile length] in this many steps


# -- the profile ---------------------------------------------------------------------------------
def influence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d_out: torch.Tensor, scaling: float,
              block: int) -> torch.Tensor:
    """Signed influence of every attention entry on the loss, summed into block x block tiles and
    over the query heads of each KV head. q (H, L, D), k/v (KV, L, D), d_out (L, H, D) = dL/d(out).
    -> (KV, nb, nb) float64, nb = ceil(L / block); tile (I, J) sums queries of block I, keys of J.

    dL_ij = -A_ij (g_ij - sum_k g_ik A_ik) / (1 - A_ij) with g = dL/dA = d_out v^T: the loss change
    of masking A_ij and renormalising its row, to first order. A row with one key (A_ij = 1) gets
    -g_ij A_ij (masking its only key), as the paper's code does for the first row.
    """
    H, L, D = q.shape
    KV = k.shape[0]
    g = H // KV
    nb = -(-L // block)
    pad = nb * block - L
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    out = torch.zeros(KV, nb, nb, dtype=torch.float64)
    for h in range(H):
        kv = h // g
        logits = (q[h].float() @ k[kv].float().T) * scaling  # (L, L)
        a = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        ga = d_out[:, h].float() @ v[kv].float().T  # (L, L) dL/dA
        ga = ga.masked_fill(~causal, 0.0)
        ag = ga * a
        e = -a * (ga - ag.sum(-1, keepdim=True)) / (1 - a).clamp_min(1e-6)
        e = torch.where(a >= 1 - 1e-6, -ag, e)
        e = torch.nn.functional.pad(e, (0, pad, 0, pad))  # (nb*block, nb*block)
        out[kv] += e.view(nb, block, nb, block).sum((1, 3)).double().cpu()
    return out


def tails(tiles: torch.Tensor) -> list[float]:
    """Influence a band of n blocks loses, n = 0..nb: tail[n] = sum of |tile (I, J)| over
    I - J >= n, J >= 1 (column 0 holds the sinks, always kept). tiles (nb, nb) (mean, signed)."""
    t = tiles.abs()
    nb = t.shape[0]
    diag = [float(torch.diagonal(t, -d)[1:].sum()) if d < nb else 0.0 for d in range(nb)]  # [J+d, J], J >= 1
    out = [0.0] * (nb + 1)
    for n in range(nb - 1, -1, -1):
        out[n] = out[n + 1] + diag[n]
    return out


@dataclass(frozen=True)
class MoAProfile:
    """The influence profile of a model: tails[i][layer] is None for layers MoA leaves alone
    (sliding-window layers), else per KV head tail[0..nb] at lengths[i] (see `tails`)."""

    model: ModelIdentity
    block: int
    lengths: tuple[int, ...]
    tails: tuple[tuple[tuple[tuple[float, ...], ...] | None, ...], ...]
    calibration: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def heads(self) -> list[tuple[int, int]]:
        """(layer, KV head) of every profiled head, in order."""
        return [(i, h) for i, row in enumerate(self.tails[0]) if row is not None for h in range(len(row))]

    def loss(self, length_idx: int, layer: int, head: int, band: float) -> float:
        """Influence lost by a band of `band` tokens (besides the sinks) at lengths[length_idx]:
        tail at band / block blocks, linear between whole blocks, clamped to [1, nb] blocks."""
        t = self.tails[length_idx][layer][head]
        x = min(max(band / self.block, 1.0), len(t) - 1.0)
        n = int(x)
        return t[n] if n == len(t) - 1 else t[n] + (x - n) * (t[n + 1] - t[n])

    def check_model(self, model) -> None:
        why = self.model.mismatch(ModelIdentity.of(model))
        if why:
            raise StateError(f"MoA profile for {self.model.name or self.model.model_type} does not fit this model: {why}")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "model": asdict(self.model), "block": self.block,
                "lengths": list(self.lengths), "calibration": self.calibration,
                "tails": [[None if r is None else [list(h) for h in r] for r in per_len] for per_len in self.tails]}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_json(), path)

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> "MoAProfile":
        """A profile from a parsed file; StateError naming what is wrong."""
        where = f" {source}" if source else ""

        def bad(why: str) -> StateError:
            return StateError(f"corrupt MoA profile{where}: {why}")

        check_header(data, FORMAT, FORMAT_VERSION, "MoA profile", source)
        model = ModelIdentity.from_json(data.get("model"), bad)
        block, lengths, calib, raw = data.get("block"), data.get("lengths"), data.get("calibration", {}), data.get("tails")
        if not _is_int(block) or block < 1:
            raise bad(f"block must be a positive integer, got {block!r}")
        if not isinstance(lengths, list) or not lengths or not all(_is_int(n) and n > block for n in lengths) \
                or sorted(set(lengths)) != lengths:
            raise bad(f"lengths must be a non-empty ascending list of integers > block, got {lengths!r}")
        if not isinstance(calib, dict):
            raise bad("calibration must be an object")
        if not isinstance(raw, list) or len(raw) != len(lengths):
            raise bad(f"tails must be a list of {len(lengths)} entries (one per length), got {json_type(raw)}")
        out = []
        for i, (n, per_len) in enumerate(zip(lengths, raw)):
            nb = -(-n // block)
            if not isinstance(per_len, list) or len(per_len) != model.num_layers:
                raise bad(f"tails[{i}] must be a list of {model.num_layers} entries (one per layer)")
            rows = []
            for j, row in enumerate(per_len):
                if (row is None) != (raw[0][j] is None):
                    raise bad(f"tails[{i}][{j}] and tails[0][{j}] must both be null or both be profiled")
                if row is not None:
                    if not isinstance(row, list) or len(row) != model.num_kv_heads:
                        raise bad(f"tails[{i}][{j}] must be null or {model.num_kv_heads} lists (one per KV head)")
                    for t in row:
                        if not (_numbers(t) and len(t) == nb + 1 and all(x >= 0 and math.isfinite(x) for x in t)
                                and all(a >= b for a, b in zip(t, t[1:]))):
                            raise bad(f"tails[{i}][{j}] must hold {nb + 1} finite, non-negative, non-increasing "
                                      f"numbers per head (length {n}, block {block})")
                    row = tuple(tuple(float(x) for x in t) for t in row)
                rows.append(row)
            out.append(tuple(rows))
        if all(r is None for r in out[0]):
            raise bad("no layer is profiled")
        return cls(model, block, tuple(lengths), tuple(out), calib)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "MoAProfile":
        """Load a profile file; with `model`, refuse a profile of another model."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
            raise StateError(f"corrupt MoA profile {path}: {e}") from e
        profile = cls.from_json(data, source=str(path))
        if model is not None:
            profile.check_model(model)
        return profile


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


# -- calibration ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """`samples` windows of real text at each profile length; the loss is the cross-entropy of the
    model's own greedy predictions (model alignment) over the second half of each window."""

    lengths: tuple[int, ...] = (1024, 2048)
    samples: int = 2
    block: int = 64  # the paper's tile (and its sink block)
    seed: int = 0


def self_aligned_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's own argmax predictions over the second half of the
    positions (the ones with the longest contexts). logits (1, L, V)."""
    x = logits[0, logits.shape[1] // 2 :].float()
    return torch.nn.functional.cross_entropy(x, x.argmax(-1).detach())


def calibrate_profile(probe: Probe, token_ids: Sequence[int], calibration: Calibration = Calibration(),
                      progress: bool = True) -> MoAProfile:
    """The influence profile of the probe's model over windows of `token_ids` (module docstring)."""
    model = probe.model
    cal = calibration
    if not cal.lengths or any(n <= cal.block for n in cal.lengths) or sorted(set(cal.lengths)) != list(cal.lengths):
        raise ValueError(f"calibration lengths must be ascending, unique and > block={cal.block}, got {cal.lengths}")
    if len(token_ids) < max(cal.lengths):
        raise ValueError(f"calibration text has {len(token_ids)} tokens; {max(cal.lengths)} are needed")
    kinds = layer_kinds(model)
    device = next(model.parameters()).device
    rng = random.Random(cal.seed)
    sums: dict[tuple[int, int], torch.Tensor] = {}  # (length index, layer) -> (KV, nb, nb)
    jobs = [(i, n) for i, n in enumerate(cal.lengths) for _ in range(cal.samples)]
    t0 = time.perf_counter()
    for i, n in tqdm(jobs, desc="MoA profile", disable=not progress):
        s = rng.randint(0, len(token_ids) - n)
        ids = torch.tensor([list(token_ids[s : s + n])], device=device)

        def observe(idx, q, k, v, scaling, d_out, i=i):
            tile = influence(q[0], k[0], v[0], d_out[0], scaling, cal.block)
            sums[(i, idx)] = sums.get((i, idx), 0) + tile

        probe.observe_gradients(ids, self_aligned_loss, observe)
    out = tuple(
        tuple(None if kinds[j] != "full" else tuple(tuple(tails(t / cal.samples)) for t in sums[(i, j)])
              for j in range(len(kinds)))
        for i in range(len(cal.lengths)))
    return MoAProfile(ModelIdentity.of(model), cal.block, tuple(cal.lengths), out, {
        "lengths": list(cal.lengths), "samples": cal.samples, "seed": cal.seed, "block": cal.block,
        "loss": "cross-entropy of the model's own greedy predictions, second half of each window",
        "gqa": "sum over the query heads of a KV head", "seconds": round(time.perf_counter() - t0, 2)})


def profile_path_for(model, model_key: str, calibration: Calibration) -> Path:
    """Where the profile of this model and calibration is cached (under paths.cache_root())."""
    from ..paths import cache_root

    ident = {k: v for k, v in asdict(ModelIdentity.of(model)).items() if k != "name"}
    key = [model_key, ident, asdict(calibration), FORMAT_VERSION]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key).name) or "model"
    return cache_root() / "moa_profiles" / f"{safe}-{digest}.json"


def load_or_calibrate(probe: Probe, tokenizer, model_key: str, calibration: Calibration = Calibration(),
                      text: str | None = None, announce: bool = True) -> MoAProfile:
    """The profile from the per-model cache, profiling once if needed (announced on stderr)."""
    from ..data.corpus import essay_text

    model = probe.model
    path = profile_path_for(model, model_key, calibration)
    if path.exists():
        _say(announce, f"Using cached MoA profile {path} (delete the file to profile again).", path)
        return MoAProfile.load(path, model=model)
    n = len(calibration.lengths) * calibration.samples
    _say(announce, f"Profiling MoA ONCE for this model: {n} forward + backward passes at lengths "
                   f"{list(calibration.lengths)}; the profile will be cached in {path}.")
    ids = tokenizer(essay_text() if text is None else text, add_special_tokens=False)["input_ids"]
    ids = torch.as_tensor(ids).flatten().tolist()
    profile = calibrate_profile(probe, ids, calibration, progress=announce)
    profile.save(path)
    _say(announce, f"MoA profile saved to {path}.")
    return profile


def _say(show: bool, line: str, once: Path | None = None) -> None:
    state_announce(show, line, log, once)


# -- the search: one elastic rule per head under a density budget --------------------------------
@dataclass(frozen=True)
class Rule:
    """A head's span S(N) = alpha + beta N tokens (sinks included)."""

    alpha: float
    beta: float

    def span(self, n: int, min_span: int) -> int:
        """Tokens kept of an N-token prompt: clamp(alpha + beta N, min_span, N)."""
        return min(max(int(self.alpha + self.beta * n), min_span), n)

    def band(self, n: int, min_span: int, sinks: int) -> int:
        """The recent band of an N-token prompt: the span less the sinks, or all N tokens when the
        span covers the prompt (the head is then dense)."""
        s = self.span(n, min_span)
        return n if s >= n else max(s - sinks, 1)


FULL = Rule(0.0, 1.0)


def rule_grid(lengths: Sequence[int], extend: int) -> list[Rule]:
    """The paper's search space: alpha in [-min length, max length] (ALPHA_STEPS steps) x beta in
    [0, 1] (NUM_BETAS), keeping rules with 0 < S(min) , S(max) <= max and S(extend) <= extend."""
    lo, hi = min(lengths), max(lengths)
    alphas = torch.linspace(-lo, hi, ALPHA_STEPS + 1).tolist()
    betas = torch.linspace(0.0, 1.0, NUM_BETAS).tolist()
    rules = [Rule(round(a, 3), round(b, 4)) for a in alphas for b in betas
             if a + b * lo > 0 and a + b * hi <= hi and a + b * extend <= extend]
    return rules if FULL in rules else rules + [FULL]


def search(profile: MoAProfile, density: float, min_span: int, sinks: int, extend: int | None = None
           ) -> tuple[tuple[tuple[Rule, ...] | None, ...], dict[str, Any]]:
    """One rule per profiled KV head keeping a mean KV fraction <= density at every profile length
    and at `extend` (default 4x the longest), with the least influence lost (summed over lengths,
    each length's influence normalised by its total). -> (rules per layer, a summary)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"MoA density must be in (0, 1], got {density}")
    heads = profile.heads()
    extend = extend or 4 * max(profile.lengths)
    if density >= 1.0:  # the whole budget: MoA compresses nothing
        return _by_layer(profile, {hd: FULL for hd in heads}), {"density": 1.0, "rules": "full everywhere"}
    grid = rule_grid(profile.lengths, extend)
    lengths = list(profile.lengths) + [extend]
    # cost[c, l]: kept fraction of rule c at length l; loss[h, c]: normalised influence lost
    cost = torch.tensor([[r.span(n, min_span) / n for n in lengths] for r in grid], dtype=torch.float64)
    totals = [sum(profile.tails[i][a][b][0] for a, b in heads) or 1.0 for i in range(len(profile.lengths))]
    loss = torch.tensor([[sum(_lost(profile, i, a, b, r.band(n, min_span, sinks), n) / totals[i]
                               for i, n in enumerate(profile.lengths)) for r in grid] for a, b in heads],
                        dtype=torch.float64)  # (Hn, C)
    Hn = len(heads)
    cap = density * Hn + 1e-9
    choice = cost.sum(-1).argmin().repeat(Hn)  # the cheapest rule everywhere
    used = cost[choice].sum(0)  # (lengths,)
    if bool((used > cap).any()):
        least = float((cost[choice[0]]).max())
        raise ValueError(f"MoA density {density} is below the least any rule keeps ({least:.4f} of the prompt at "
                         f"min_span={min_span}); raise density or lower sinks/window")
    rows = torch.arange(Hn)
    while True:
        d_loss = loss[rows, choice][:, None] - loss  # (Hn, C) > 0: an improvement
        d_cost = cost[None] - cost[choice][:, None]  # (Hn, C, lengths)
        ok = ((used + d_cost) <= cap).all(-1) & (d_loss > 1e-12)
        if not bool(ok.any()):
            break
        gain = d_loss / d_cost.sum(-1).clamp_min(1e-9)
        flat = int(torch.where(ok, gain, -1.0).flatten().argmax())
        h, c = divmod(flat, len(grid))
        used = used + d_cost[h, c]
        choice[h] = c
    picked = {hd: grid[int(c)] for hd, c in zip(heads, choice)}
    summary = {"density": density, "extend": extend, "kept": dict(zip(map(str, lengths), used.div(Hn).tolist())),
               "lost": float(loss[rows, choice].sum()), "grid": len(grid)}
    return _by_layer(profile, picked), summary


@lru_cache(maxsize=32)
def _search_once(profile: MoAProfile, density: float, min_span: int, sinks: int):
    """search(), remembered: the eval builds the method once per batch."""
    return search(profile, density, min_span, sinks)


def _lost(profile: MoAProfile, i: int, layer: int, head: int, band: int, n: int) -> float:
    return 0.0 if band >= n else profile.loss(i, layer, head, band)


def _by_layer(profile: MoAProfile, picked: Mapping[tuple[int, int], Rule]) -> tuple[tuple[Rule, ...] | None, ...]:
    return tuple(None if row is None else tuple(picked[(i, h)] for h in range(len(row)))
                 for i, row in enumerate(profile.tails[0]))


# -- the method ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoA(Method):
    """Per-head elastic sliding windows: head h keeps `sinks` tokens and a band so that its span is
    clamp(alpha_h + beta_h N, sinks + window, N) for an N-token prompt (the rules: `search`)."""

    profile: MoAProfile
    density: float = 0.5
    sinks: int = 64
    window: int = 64
    block_size: int = 64
    name: str = "moa"
    # per KV head, searched over the whole model's heads; a tensor-parallel rank takes its heads' rules
    _rules: tuple = per_head("kv", default=(), init=False, repr=False, compare=False)
    _summary: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.window < 1 or self.block_size < 1:
            raise ValueError("MoA needs sinks >= 0, window >= 1, block_size >= 1")
        rules, summary = _search_once(self.profile, self.density, self.sinks + self.window, self.sinks)
        object.__setattr__(self, "_rules", rules)
        object.__setattr__(self, "_summary", dict(summary))

    def rules(self, layer_idx: int) -> tuple[Rule, ...] | None:
        """Each KV head's rule in a layer (None: a layer MoA leaves alone)."""
        return self._rules[layer_idx]

    def check_model(self, model) -> None:
        self.profile.check_model(model)

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        # decode appends and never evicts (the ragged cache drops by rank, not by age): docs/methods.md
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)

    def bands(self, seq_len: int, key_start: torch.Tensor, rules: Sequence[Rule]) -> torch.Tensor:
        """(B, KV) int64 band of each (row, head): its span at the row's own length minus the sinks."""
        n = (seq_len - key_start.long()).tolist()
        bands = [[r.band(m, self.sinks + self.window, self.sinks) for r in rules] for m in n]
        return torch.tensor(bands, dtype=torch.long, device=key_start.device)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> TokenPlan | None:
        rules = self.rules(layer_idx)
        B, KV, L, _ = k.shape
        if rules is None:
            return None
        if len(rules) != KV:
            raise ValueError(f"MoA profile has {len(rules)} KV heads in layer {layer_idx}, the model {KV}")
        geo = local_geometry(L, self.block_size, self.window)
        if geo is None:  # even a row without padding stays dense
            return None
        _, local_start = geo
        _, row_ls = row_geometry(L, key_start, self.block_size, self.window) if padded else (None, None)
        ls = row_ls if row_ls is not None else torch.full_like(key_start, local_start)
        region = global_region(L, key_start, ls)  # (B, L)
        band = self.bands(L, key_start, rules)  # (B, KV)
        pos = torch.arange(L, device=k.device)
        recent = pos[None, None, :] >= (L - band)[..., None]  # (B, KV, L) the last `band` tokens
        mask = (sink_mask(L, key_start, self.sinks)[:, None, :] | recent) & region[:, None, :]
        kept_idx, kept_len = pack_mask(mask)
        return TokenPlan(kept_idx, kept_len, local_start, self.window, self.block_size, key_start,
                         self.decode_keep(layer_idx, KV), row_local_start=row_ls, head_window=band)

    def report(self) -> dict:
        return {"moa": self._summary}


def density_for(kept_fraction: float, seq_len: int, params: Mapping[str, Any]) -> float:
    """The density knob is the budget itself (mean kept KV fraction, held at the profile lengths
    and the extension; between them the kept fraction is at most the budget)."""
    return round(min(1.0, max(kept_fraction, 1e-4)), 4)
