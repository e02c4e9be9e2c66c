"""TCA-Attention (arXiv 2512.09238): calibrated head budgets + last-query adaptive selection."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import selection as sel
from ..budgets import Budgets
from ..engine.plan import TokenPlan
from .base import Method, key_validity, local_geometry, sink_mask


def select_tokens(
    s: torch.Tensor, p: torch.Tensor, n_blocks: int, block_size: int, alpha: float, mass_norm: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 2 steps 4-6 on importance s (B, KV, L) with per-head ladders p (KV, |K|).

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
    """TCA with calibrated budgets. dense_below: prompts shorter than this stay dense (all
    kept), for devices where selection does not pay off on short prompts (0 = never)."""

    budgets: Budgets
    dense_below: int = 0
    name: str = "tca"
    # per-(layer, device) ladders and decode counts, built once: no host work or copies per prefill
    _per_layer: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _layer(self, layer_idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer_idx, str(device))
        if key not in self._per_layer:
            self._per_layer[key] = (self.budgets.layer_p(layer_idx).to(device),
                                    self.budgets.layer_decode_keep(layer_idx).to(device))
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

    def plan(self, layer_idx, q, k, key_start, scaling) -> TokenPlan | None:
        cfg = self.budgets.config
        B, KV, L, _ = k.shape
        geo = local_geometry(L, cfg.block_size, cfg.window)
        if geo is None or L < self.dense_below:
            return None
        n, local_start = geo
        valid = key_validity(L, key_start)
        s = sel.last_query_importance(q[:, :, -1], k, valid, scaling)
        mask, _ = select_tokens(s, self._layer(layer_idx, s.device)[0], n, cfg.block_size, cfg.alpha, cfg.mass_norm)
        mask &= valid[:, None, :local_start]
        if cfg.sink_tokens:
            mask |= sink_mask(local_start, key_start, cfg.sink_tokens)[:, None, :]
        kept_idx, kept_len = sel.pack_mask(mask)
        retained = (s[..., :local_start] * mask).sum(-1) + s[..., local_start:].sum(-1)
        return TokenPlan(kept_idx, kept_len, local_start, cfg.window, cfg.block_size, key_start,
                         self._layer(layer_idx, k.device)[1], retained)
