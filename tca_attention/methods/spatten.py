"""SpAtten's cascade token pruning (Wang, Zhang and Han, HPCA'21, "SpAtten: Efficient Sparse Attention
Architecture with Cascade Token and Head Pruning"), the algorithm on the shared engine.

A token's importance is the attention probability it receives, summed over heads and over the
queries of the tokens still present, accumulated layer after layer. At each pruning layer the
tokens of lowest cumulative importance are pruned; a pruned token stays pruned in every later
layer of the same prefill (cascade), so the kept sets shrink: kept(l + 1) is a subset of kept(l).

On the engine, per row (tokens counted from its first real one): the recent window (the local
region of a TokenPlan, between `window` and `window + block_size` tokens) is always kept; the rest
(the global region) is pruned. Full layers before relative depth `start` (at least the first
layer, which has no importance yet; also the first full layer of a model whose first layers use
sliding windows, which are never scored) stay dense and only accumulate; from there on, layer l keeps
ceil(f_l x n) tokens of an n-token row (the local region included), with the geometric schedule
f_l = keep ** ((l - s0 + 1) / (N - s0)) (s0: the first pruning layer, N: the model's layers), so
the last layer keeps `keep`. Each layer's kept set is a TokenPlan shared by its KV heads (the
importance is summed over heads): the ragged cache keeps just those tokens, the KV saving.
The probabilities accumulated are those of the attention each layer runs (its plan's mask), from
the queries of tokens not pruned: the engine's column mass (dispatch.column_mass; a Triton kernel
on CUDA), two extra q.k passes per layer without the P.V.

Per-prefill state (the cumulative scores and the kept set) lives on the method object, reset when
a forward starts again (a layer index not above the last one seen, or a new batch shape); a
batch's rows are independent (everything is per row).

Cascade head pruning (`heads` < 1; off by default): a query head's importance is the magnitude of
its attention output (L1 over the dimension and the tokens still present), accumulated over
layers through observe_prefill; from the first pruning layer the heads follow the same geometric
schedule down to `heads` of the query heads at the last layer, each layer choosing among the heads
the previous one kept; a dropped head outputs zeros at prefill (TokenPlan.head_keep). Decode and
the cache are unaffected (every head attends in decode).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch

from ..engine import dispatch
from ..engine.plan import TokenPlan, pack_mask
from .base import ONE_PROCESS, HeadGroup, Method, first_at_depth, global_region, key_validity, local_geometry, model_depth, row_geometry


@dataclass(frozen=True)
class SpAtten(Method):
    keep: float = 0.3
    start: float = 0.0
    window: int = 128
    block_size: int = 64
    heads: float = 1.0  # query heads kept at the last layer (1: no head pruning, the default)
    name: str = "spatten"
    combines_heads = True  # token importance summed over heads; heads ranked against each other
    _state: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.keep <= 1:
            raise ValueError(f"spatten needs 0 <= keep <= 1 (fraction of the prompt kept at the last layer), got {self.keep}")
        if not 0 <= self.start <= 1:
            raise ValueError(f"spatten needs 0 <= start <= 1 (relative depth of the first pruning layer), got {self.start}")
        if not 0 < self.heads <= 1:
            raise ValueError(f"spatten needs 0 < heads <= 1 (fraction of query heads kept at the last layer), got {self.heads}")
        if self.window < 1 or self.block_size < 1:
            raise ValueError(f"spatten needs window >= 1 and block_size >= 1, got {self.window}, {self.block_size}")

    def check_model(self, model) -> None:
        self._state["layers"] = model_depth(model)

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)

    def first_pruning_layer(self) -> int:
        if "layers" not in self._state:
            raise RuntimeError("spatten: the model's depth is unknown; call method.check_model(model) first "
                               "(tca_attention.enable does)")
        return max(1, first_at_depth(self.start, self._state["layers"]))

    def fraction(self, layer_idx: int, final: float | None = None) -> float:
        """Fraction of each row's prompt (or, with final=heads, of the query heads) layer `layer_idx`
        keeps: 1 before the first pruning layer, then a geometric decay to `final` (default: keep)."""
        s0, n = self.first_pruning_layer(), self._state["layers"]
        if layer_idx < s0:
            return 1.0
        return (self.keep if final is None else final) ** ((min(layer_idx, n - 1) - s0 + 1) / (n - s0))

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True,
             heads: HeadGroup = ONE_PROCESS) -> TokenPlan | None:
        """The kept set of this layer as a TokenPlan (None: a dense layer before the first pruning
        one, or a prompt too short to have a global region). Updates the cumulative importance.
        heads: q and k hold this process's share of the layer's heads; the importance is summed
        over every head, and head pruning ranks every query head."""
        B, H, L, _ = q.shape
        KV = k.shape[1]
        geo = local_geometry(L, self.block_size, self.window)
        if geo is None:  # every token is in the recent window: nothing to prune
            self._state.pop("last", None)  # nor any state to carry: the next planned layer starts afresh
            return None
        ks = key_start.to(device=q.device, dtype=torch.long)
        _, row_ls = row_geometry(L, ks, self.block_size, self.window) if padded else (None, None)
        ls = row_ls if row_ls is not None else torch.full_like(ks, geo[1])
        st = self._begin(layer_idx, ks, ls, L, H, heads)
        real = key_validity(L, ks)
        if layer_idx < self.first_pruning_layer() or st["scored"] == 0:  # no importance yet: dense
            self._accumulate(q, k, ks, real, None, scaling, backend, heads)
            st["scored"] += 1
            return None
        kept = self.prune(st["score"], st["kept"], ks, ls, L, self.fraction(layer_idx))
        st["kept"] = kept
        kept_idx, kept_len = pack_mask(kept[:, None, :].expand(B, KV, L))
        plan = TokenPlan(kept_idx, kept_len, geo[1], self.window, self.block_size, ks,
                         self.decode_keep(layer_idx, KV), row_local_start=row_ls)
        local = torch.arange(L, device=q.device)[None, :] >= ls[:, None]
        self._accumulate(q, k, ks, real & (kept | local), plan, scaling, backend, heads)  # queries still present
        st["scored"] += 1
        if self.heads < 1:  # cascade head pruning: the heads of lowest cumulative output magnitude, of every head
            want = max(1, math.ceil(self.fraction(layer_idx, self.heads) * H * heads.world))
            st["heads"] = self.prune_heads(heads.gather(st["head_mag"], 1), st["heads"], want)
            plan = replace(plan, head_keep=heads.own(st["heads"], 1))  # (B, H) this process's heads
        return plan

    @staticmethod
    def prune_heads(magnitude: torch.Tensor, kept: torch.Tensor, want: int) -> torch.Tensor:
        """Of the query heads still kept (B, H), the `want` of highest cumulative magnitude (ties: the
        lower head). Always a subset."""
        H = kept.shape[-1]
        order = torch.where(kept, magnitude, -1.0).sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(H, device=kept.device).expand_as(order))
        return kept & (rank < want)

    def observe_prefill(self, layer_idx: int, out: torch.Tensor) -> None:
        """Head pruning's importance: add each query head's output magnitude (L1 over the dimension
        and the tokens still present) at this layer to its cumulative magnitude."""
        st = self._state
        if self.heads >= 1 or st.get("last") != layer_idx or "counted" not in st:
            return  # head pruning off, or a layer this prefill did not plan (too short a prompt)
        w = st["counted"]  # (B, L) the tokens still present
        st["head_mag"] += torch.einsum("blhd,bl->bh", out.float().abs(), w.float())

    def kept_sets(self) -> torch.Tensor | None:
        """(B, L) bool: the global-region tokens still kept after the last planned layer (tests)."""
        return self._state.get("kept")

    def _begin(self, layer_idx: int, ks: torch.Tensor, ls: torch.Tensor, L: int, H: int,
               heads: HeadGroup = ONE_PROCESS) -> dict:
        """The per-prefill state, reset when a new forward (or another batch) starts: head_mag per
        query head of this process (H), the kept heads over every head (H x heads.world)."""
        st = self._state
        sig = (tuple(ks.shape), L, H)
        if st.get("last", math.inf) >= layer_idx or st.get("sig") != sig or not torch.equal(st["ks"], ks):
            st.update(sig=sig, ks=ks.clone(), score=torch.zeros(ks.shape[0], L, dtype=torch.float32, device=ks.device),
                      kept=global_region(L, ks, ls), scored=0,
                      head_mag=torch.zeros(ks.shape[0], H, dtype=torch.float32, device=ks.device),
                      heads=torch.ones(ks.shape[0], H * heads.world, dtype=torch.bool, device=ks.device))
        st["last"] = layer_idx
        return st

    @staticmethod
    def prune(score: torch.Tensor, kept: torch.Tensor, ks: torch.Tensor, ls: torch.Tensor, L: int, f: float) -> torch.Tensor:
        """The next kept set: of the tokens still kept (B, L), those of highest cumulative score (ties:
        the earlier token), ceil(f x n) per row with the local region counted in. Always a subset."""
        n = L - ks
        want = torch.ceil(f * n.double()).long() - (L - torch.maximum(ks, ls))  # global tokens to keep
        want = want.clamp_min(0)
        pos = torch.arange(L, device=score.device)
        order = torch.where(kept, score, -1.0).sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))
        return kept & (rank < want[:, None])

    def _accumulate(self, q, k, ks, counted, plan: TokenPlan | None, scaling, backend,
                    heads: HeadGroup = ONE_PROCESS) -> None:
        """Add this layer's attention probabilities (its plan's mask; None: dense causal), summed over
        every head (this process's, then over the processes) and the `counted` queries (B, L), to the
        cumulative score (the engine's column mass)."""
        self._state["counted"] = counted
        mass = dispatch.column_mass(q, k, scaling, ks, counted.float(), plan, backend)  # (B, KV, L)
        self._state["score"] += heads.sum(mass.sum(1))


def keep_for(kept_fraction: float, prompt_tokens: int, params: Mapping[str, Any]) -> float:
    """`keep` whose schedule keeps about kept_fraction of a prompt in the cache, averaged over layers
    (the registry's density knob). The model's depth is not known here: the schedule is averaged in
    the continuous limit (a share `start` of the layers dense, then keep ** u for u over (0, 1],
    each layer at least the local region), which is within about 1 / (number of layers) of the
    discrete schedule. Monotone in keep, so a bisection finds it; clamped to [0, 1]."""
    base = SpAtten(**params)
    geo = local_geometry(prompt_tokens, base.block_size, base.window)
    floor = 1.0 if geo is None else (prompt_tokens - geo[1]) / prompt_tokens
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000

    def mean_kept(keep: float) -> float:
        return base.start + (1 - base.start) * float(torch.clamp(keep ** u, min=floor).mean())

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_kept(mid) < kept_fraction else (lo, mid)
    return round(hi, 4)
