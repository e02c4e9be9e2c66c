"""TCA-Attention (arXiv 2512.09238): calibrated head budgets + last-query adaptive selection."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ...engine import dispatch
from ...engine.dispatch import resolve
from ...engine.plan import TokenPlan, pack_mask
from ..base import Method, global_region, local_geometry, row_geometry, sink_mask
from . import selection as sel
from .budgets import Budgets
from .adaptive import FloorChooser
from .select import SelectionSpec, select_and_pack_window, window_mask_ref, window_retained_ref

log = logging.getLogger(__name__)


def select_tokens(
    s: torch.Tensor, p: torch.Tensor, n_blocks: int, block_size: int, alpha: float, mass_norm: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 2 steps 4-6 on importance s (B, KV, L) with per-head ladders p (KV, |K|), every row
    with the same n blocks from position 0 (no padding; calibration's simulation).

    -> (keep mask over the global region (B, KV, n*b) bool, keep count per block (B, KV, n)).
    """
    B, KV, _ = s.shape
    sb = s[..., : n_blocks * block_size].reshape(B, KV, n_blocks, block_size)
    h = sel.block_redundancy(sb, alpha, mass_norm)  # (B, KV, n)
    keep_rank = sel.keep_per_rank(p.to(s.device), n_blocks, block_size)  # (KV, n)
    keep = sel.keep_per_block(h, keep_rank.expand(B, KV, n_blocks))
    return sel.topk_within_blocks(sb, keep).reshape(B, KV, -1), keep


@dataclass(frozen=True)
class TCA(Method):
    """TCA with calibrated budgets.

    dense_below: prompts (each row's real tokens) shorter than this stay dense, everything kept.
    "auto": on a GPU, the length from which TCA's prefill is measured to beat dense attention on
    this device and head shape (crossover.py: measured once, cached; never slower than dense);
    on the CPU, 0. An int: that length (0 = never dense).

    Selection options beyond the paper's rule (docs/method.md, "Selection options"; the budgets
    are calibrated with the paper's rule either way):
    last_q: importance pooled over the last r queries (mean of their causal softmax rows) instead
        of the last query alone (1, the paper's rule). At most the window.
    gqa: "shared" (one importance per KV head, the mean over its query heads: the paper's rule as
        we read it) or "union" (each query head selects with its own importance and the KV
        head's keep counts; the KV head keeps the union, so it may keep up to g times more).
    floor: adaptive mode when > 0: per request and KV head, the cheapest ladder candidate whose
        selection retains >= floor of the selection queries' attention mass, dense where none
        does (adaptive.py). 0 (off): the calibrated budget.
    span: tokens rank inside their block by their importance plus the largest importance within
        span // 2 positions (selection.span_scores, an odd width; 1: the paper's rule), so the
        neighbours of a strongly attended token are kept with it (a multi-token value stays
        whole); the budgets, block ranking and kept counts do not change.
    dense_layers: the first n decoder layers keep everything (prefill and decode), whatever their
        budgets (0: the budgets decide every layer).
    dense_at: decoder layers (indices) that keep everything likewise, e.g. the few layers where
        a model is most sensitive to sparsity (layer_probe.py finds them: `dense_at=auto` in a spec,
        `tca probe-layers`).
    Every option runs the fused selection (Triton on a GPU, no host sync); only sink tokens run
    the PyTorch reference selection (which syncs once per layer to size the plan); report() says
    which. With gqa="union" the plan is as wide as g times the largest budget (at most the global
    region): its kept_len gives each head's count.
    """

    budgets: Budgets
    dense_below: int | str = "auto"
    last_q: int = 1
    gqa: str = "shared"
    floor: float = 0.0
    span: int = 1
    dense_layers: int = 0
    dense_at: tuple[int, ...] = ()
    name: str = "tca"
    # per-(layer, device) ladders and decode counts, built once: no host work or copies per prefill
    _per_layer: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # per-(layer, n_blocks, device) keep count per rank and host-side kept sizes
    _rank_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dense_below != "auto" and not (isinstance(self.dense_below, int) and self.dense_below >= 0):
            raise ValueError(f"dense_below must be an int >= 0 or 'auto', got {self.dense_below!r}")
        if isinstance(self.last_q, bool) or not isinstance(self.last_q, int) or not 1 <= self.last_q <= self.window:
            raise ValueError(f"last_q must be an int in [1, window={self.window}], got {self.last_q!r}")
        if self.gqa not in ("shared", "union"):
            raise ValueError(f"gqa must be 'shared' or 'union', got {self.gqa!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1] (0 = adaptive mode off), got {self.floor!r}")
        if self.floor > 0 and self.gqa == "union":
            raise ValueError("floor (adaptive mode) and gqa='union' do not combine: the floor is reached on the "
                             "shared selection")
        if (isinstance(self.span, bool) or not isinstance(self.span, int) or self.span < 1 or self.span % 2 == 0
                or self.span > self.block_size):
            raise ValueError(f"span must be an odd int in [1, block_size={self.block_size}], got {self.span!r}")
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"dense_layers must be an int >= 0, got {self.dense_layers!r}")
        at = self.dense_at
        if (not isinstance(at, tuple) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in at)
                or len(set(at)) != len(at)):
            raise ValueError(f"dense_at must be a tuple of distinct layer indices >= 0, got {at!r}")
        n_layers = len(self.budgets.layers)
        if any(i >= n_layers for i in at):
            raise ValueError(f"dense_at {at} names a layer the model does not have ({n_layers} layers)")
        sliding = [i for i in at if self.budgets.layers[i] is None]
        if sliding:
            raise ValueError(f"dense_at names sliding-window layer(s) {sliding}: TCA leaves those alone")
        if self.floor > 0 and self.span > 1:
            raise ValueError("floor (adaptive mode) and span do not combine: the floor's retained mass assumes the "
                             "tokens are kept in order of importance")

    @property
    def fused(self) -> bool:
        """Whether the selection is the fused one (Triton on a GPU): every option (last_q, gqa,
        floor, span); not with sink tokens (PyTorch reference)."""
        return not self.budgets.config.sink_tokens

    def model_crossover_pending(self, device: torch.device) -> bool:
        """dense_below="auto" on a GPU with the Triton kernels, not yet measured on this model."""
        return (self.dense_below == "auto" and device.type == "cuda" and dispatch.triton_available()
                and ("model_crossover", str(device)) not in self._per_layer)

    def use_model_crossover(self, device: torch.device, tokens: int) -> None:
        self._per_layer[("model_crossover", str(device))] = tokens

    def _dense_below(self, q: torch.Tensor) -> int:
        """dense_below resolved for q's device: the model-level crossover when the session measured
        one, else the per-layer one of this head shape (cached: one look-up per device)."""
        if self.dense_below != "auto":
            return self.dense_below
        model_level = self._per_layer.get(("model_crossover", str(q.device)))
        if model_level is not None:
            self._per_layer["dense_below_used"] = model_level
            return model_level
        key = ("dense_below", str(q.device), q.shape[1], q.shape[-1], q.dtype)
        if key not in self._per_layer:
            from .crossover import crossover

            self._per_layer[key] = crossover(self, q.shape[1], q.shape[-1], q.dtype, q.device)
        self._per_layer["dense_below_used"] = self._per_layer[key]
        return self._per_layer[key]

    def report(self) -> dict:
        """dense_below as configured and as last resolved ("auto": the measured crossover)."""
        out = {"dense_below": self.dense_below, "dense_below_used": self._per_layer.get("dense_below_used")}
        if self.dense_layers:
            out["dense_layers"] = self.dense_layers
        if self.dense_at:
            out["dense_at"] = list(self.dense_at)
        if (self.last_q, self.gqa, self.floor, self.span) != (1, "shared", 0.0, 1):
            out.update(last_q=self.last_q, gqa=self.gqa, floor=self.floor, span=self.span,
                       selection=("fused (Triton on a GPU)" if self.fused else
                                  "PyTorch reference (no Triton kernel for sink tokens)"))
        return out

    def _chooser(self, device: torch.device) -> FloorChooser | None:
        """The adaptive mode's keep-count chooser on `device` (None when off), built once."""
        if self.floor <= 0:
            return None
        key = ("floor", str(device))
        if key not in self._per_layer:
            ladder = torch.tensor(self.budgets.candidates, dtype=torch.float64)
            self._per_layer[key] = FloorChooser(sel.ladder_cumsum(ladder).to(device), self.floor)
        return self._per_layer[key]

    def _layer(self, layer_idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer_idx, str(device))
        if key not in self._per_layer:
            keep = self.budgets.layer_decode_keep(layer_idx)
            if self._forced_dense(layer_idx):  # a dense layer keeps whole blocks in decode
                keep = torch.full_like(keep, self.block_size)
            self._per_layer[key] = (self.budgets.layer_p(layer_idx).to(device), keep.to(device))
        return self._per_layer[key]

    def _forced_dense(self, layer_idx: int) -> bool:
        """The options make this layer dense (dense_layers, dense_at), whatever its budgets."""
        return layer_idx < self.dense_layers or layer_idx in self.dense_at

    def _all_dense(self, layer_idx: int) -> bool:
        """Every KV head of the layer is dense in the budgets: plan nothing, keep a dense cache."""
        key = (layer_idx, "all_dense")
        if key not in self._per_layer:
            heads = self.budgets.layers[layer_idx] or ()
            self._per_layer[key] = all(self.budgets.choice(layer_idx, h) is None for h in range(len(heads)))
        return self._per_layer[key]

    @property
    def block_size(self) -> int:
        return self.budgets.config.block_size

    @property
    def window(self) -> int:
        return self.budgets.config.window

    def check_model(self, model) -> None:
        self.budgets.check_model(model)

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return self._layer(layer_idx, torch.device("cpu"))[1]

    def _ranks(self, layer_idx: int, n_blocks: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
        """Keep count per block rank (KV, n) int32 on `device`, the largest per-head kept count and
        the sum over heads (host ints, exact without padding). Built on the CPU once per (layer, n, device)."""
        key = (layer_idx, n_blocks, str(device))
        hit = self._rank_cache.get(key)
        if hit is None:
            if len(self._rank_cache) >= 1024:  # many prompt lengths: start again rather than grow
                self._rank_cache.clear()
            kr = sel.keep_per_rank(self.budgets.layer_p(layer_idx), n_blocks, self.block_size)  # CPU
            per_head = kr.sum(-1)
            hit = (kr.to(device=device, dtype=torch.int32), int(per_head.max()), int(per_head.sum()))
            self._rank_cache[key] = hit
        return hit

    def _row_ranks(self, layer_idx: int, n_rows: torch.Tensor, n_max: int) -> torch.Tensor:
        """Keep count per rank of each row's own block count, (B, KV, n_max) int32 on n_rows' device,
        without a host sync: the same bits as _ranks(layer, n_r) (selection.bucket_ends)."""
        key = (layer_idx, "cum", str(n_rows.device))
        if key not in self._per_layer:  # cumulative ladder built on the CPU once, then moved
            self._per_layer[key] = sel.ladder_cumsum(self.budgets.layer_p(layer_idx)).to(n_rows.device)
        return sel.keep_per_rank_rows(self._per_layer[key], n_rows, n_max, self.block_size).to(torch.int32)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> TokenPlan | None:
        cfg = self.budgets.config
        B, KV, L, _ = k.shape
        b, w = cfg.block_size, cfg.window
        geo = local_geometry(L, b, w)
        dense_below = self._dense_below(q)
        # every row is at most L long: if even an unpadded row stays dense, the whole batch does
        # (the adaptive mode may compress a layer whose budgets are all dense)
        if (geo is None or L < dense_below or self._forced_dense(layer_idx)
                or (self._all_dense(layer_idx) and self.floor <= 0)):
            return None
        n_max, local_start = geo
        decode_keep = self._layer(layer_idx, k.device)[1]
        # kept counts grow with n, so the unpadded row's largest count bounds every row's
        keep_rank, max_kept, total = self._ranks(layer_idx, n_max, k.device)  # (KV, n_max)
        n_rows, row_ls = n_max, None
        if padded:  # per-row geometry: each row's blocks start at its first real token
            n_rows, row_ls = row_geometry(L, key_start, b, w, dense_below)
            keep_rank = self._row_ranks(layer_idx, n_rows, n_max)  # (B, KV, n_max)
        choose = self._chooser(k.device)
        if choose is not None:  # any head may grow to dense: the plan is as wide as the global region
            max_kept, total = n_max * b, None
        r, union = self.last_q, self.gqa == "union"
        if union:  # the KV head keeps the union of its g query heads' selections
            max_kept, total = min(q.shape[1] // KV * max_kept, n_max * b), None
        spec = SelectionSpec(key_start, keep_rank, n_rows, b, cfg.alpha, cfg.mass_norm, max_kept, self.span)
        if self.fused:  # fused selection: no host sync on the Triton path
            kept_idx, kept_len, retained, _ = select_and_pack_window(q[:, :, -r:], k, spec, scaling, w, union,
                                                                     backend=backend, choose=choose)
            # without padding every head keeps exactly its ladder's count (a permutation of keep_rank)
            return TokenPlan(kept_idx, kept_len, local_start, w, b, key_start, decode_keep, retained,
                             kept_total=None if padded or total is None else B * total, row_local_start=row_ls)
        if "noted" not in self._per_layer and resolve(backend, k.device) == "triton":
            self._per_layer["noted"] = True
            log.info("TCA selection with sink_tokens=%d runs the PyTorch reference: the Triton selection has no "
                     "sink tokens", cfg.sink_tokens)
        mask, s, rows = window_mask_ref(q[:, :, -r:], k, spec, scaling, union, choose)
        ls = row_ls if row_ls is not None else torch.full_like(key_start, local_start)
        glob = global_region(L, key_start, ls)  # (B, L)
        mask |= (sink_mask(L, key_start, cfg.sink_tokens) & glob)[:, None, :]
        kept_idx, kept_len = pack_mask(mask)
        retained = window_retained_ref(s, mask, rows, ls, w)
        return TokenPlan(kept_idx, kept_len, local_start, w, b, key_start, decode_keep, retained,
                         row_local_start=row_ls)
