"""Token-level decode selection shared by the decode-side peers (TokenSelect, TidalDecode, Recycled
Attention): they prefill densely, keep the whole cache (every token in the ragged layer's tail) and
at each decode step list the tail slots each (row, KV head) reads, as a DecodeSelection of page 1.

Row r's real tokens are tail slots [start_r, end) (its left padding before start_r); masks here are
(B, KV, T) over tail slots, never True on padding. On a dynamic layer end = T = the tail's fill (a
host int); on a static layer (static_cache.StaticRaggedLayer, graph-captured steps) T is the whole
ring, which never wraps here (nothing is compressed: slot = position), and end its device position
counter (1,): every shape is then fixed for the request and nothing reads a value on the host.
Read fractions are counted in place on the device and read only by report().
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..engine.plan import DecodeSelection
from .base import Method

if TYPE_CHECKING:
    from ..ragged_cache import RaggedLayer


def tail_rows(layer: "RaggedLayer", name: str) -> tuple[torch.Tensor, torch.Tensor | int, int]:
    """(start (B,) int64: each row's first real tail slot, end: one past the last filled slot (the
    host fill, or a static layer's device counter (1,)), T: tail slots scored). Raises if the cache
    dropped tokens (these methods read from the whole cache)."""
    if layer.t_pos0 != 0 or (layer.g_pos is not None and layer.g_pos.shape[0]):
        raise RuntimeError(f"{name}: the cache dropped tokens; {name} needs the whole cache (decode_keep = block)")
    start = (layer.t_first - layer.t_pos0).long()
    if layer.is_static:
        return start, layer.next_pos, layer.t_keys.shape[2]
    return start, layer.t_fill, layer.t_fill


def slot_ids(T: int, device: torch.device) -> torch.Tensor:
    """(1, T) tail slot ids."""
    return torch.arange(T, device=device)[None, :]


def real_slots(start: torch.Tensor, end: torch.Tensor | int, T: int) -> torch.Tensor:
    """(B, T) True on each row's real tail slots [start_r, end)."""
    ids = slot_ids(T, start.device)
    real = ids >= start[:, None]
    return real if isinstance(end, int) and end >= T else real & (ids < end)


def current_slot(end: torch.Tensor | int, T: int, device: torch.device) -> torch.Tensor:
    """(1, T) True on the step's own token (slot end - 1)."""
    return slot_ids(T, device) == end - 1


def group_logits(q: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """The last query of q (B, H, Q, D) against keys (B, KV, T, D): (B, KV, G, T) fp32 logits x scaling,
    G = H // KV query heads per KV head. One matmul in the keys' dtype (fp32 accumulation; no fp32
    copy of the cache), the small result in fp32."""
    B, H, _, D = q.shape
    KV = keys.shape[1]
    qg = q[:, :, -1].to(keys.dtype).reshape(B, KV, H // KV, D)
    return torch.matmul(qg, keys.transpose(-1, -2)).float() * scaling


def top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """(..., T) bool: the k entries of largest score per row among the finite ones (-inf: ineligible;
    fewer eligible entries than k: all of them)."""
    k = min(k, score.shape[-1])
    top = score.topk(k, dim=-1)
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    return mask.scatter_(-1, top.indices, top.values > float("-inf"))


def selection_from_mask(mask: torch.Tensor, width: int) -> DecodeSelection:
    """mask (B, KV, T) bool with at most `width` True per (row, KV head) -> a token-level
    DecodeSelection (B, KV, min(width, T)): the True slots ascending, then -1."""
    B, KV, T = mask.shape
    width = max(1, min(width, T))
    slot = torch.where(mask, mask.long().cumsum(-1) - 1, width)  # width: a dump slot
    pages = torch.full((B, KV, width + 1), -1, dtype=torch.int32, device=mask.device)
    ids = torch.arange(T, dtype=torch.int32, device=mask.device).expand(B, KV, T)
    pages.scatter_(2, slot, torch.where(mask, ids, -1))
    return DecodeSelection(1, pages[..., :width].contiguous())


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (B, N) fp32 tensors -> (B,)."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def keep_in_place(state: dict, key: str, value: torch.Tensor) -> None:
    """state[key] = value, in place when the shapes match (a static layer's per-request state keeps
    its address: a replayed CUDA graph reads and writes it); a new tensor when they do not (a
    dynamic layer's state grows with its fill)."""
    if state[key].shape == value.shape:
        state[key].copy_(value)
    else:
        state[key] = value


class ReadCounter:
    """Decode steps seen, the dense ones among them and the sum of the read fractions (mean over rows
    of the real cached tokens attended, averaged over KV heads; a step reading everything counts 1).
    Accumulated in place in one device tensor (a replayed CUDA graph runs no Python), read only by
    fraction()."""

    def __init__(self) -> None:
        self.acc: torch.Tensor | None = None  # (3,) float64: steps, dense steps, sum of fractions

    def _acc(self, device: torch.device) -> torch.Tensor:
        if self.acc is None or self.acc.device != device:  # first step (eager), or a new device
            self.acc = torch.zeros(3, dtype=torch.float64, device=device) if self.acc is None else self.acc.to(device)
        return self.acc

    def count_dense(self, device: torch.device) -> None:
        self._acc(device)[:2].add_(1)

    def add(self, frac: torch.Tensor) -> None:
        """A selecting step that read the fraction frac (a device scalar)."""
        acc = self._acc(frac.device)
        acc[0].add_(1)
        acc[2].add_(frac)

    def count(self, mask: torch.Tensor, n: torch.Tensor) -> None:
        """A step reading mask (B, KV, T) of rows holding n (B,) real tokens."""
        read = mask.sum(-1).double().mean(-1)  # (B,)
        self.add((read / n.clamp_min(1).double()).mean())

    def fraction(self) -> float | None:
        if self.acc is None:
            return None
        steps, dense, total = self.acc.tolist()
        return (dense + total) / steps if steps else None


class ReadsFromFullCache(Method):
    """What the decode-side methods (tokenselect, tidaldecode, recycled) share: a dense prefill, a
    ragged cache that keeps every token (whole blocks kept: it never evicts), and per decode step
    the tokens select_decode lists. A subclass gives `reads_at_most`, the most tokens a (row, KV
    head) reads in a selecting step: a cache within it is read whole."""

    reads_at_most: int

    @property
    def block_size(self) -> int:  # the ragged cache's geometry: no prefill plan, nothing compressed away
        return 16

    @property
    def window(self) -> int:
        return 16

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> None:
        return None  # dense prefill; the cache keeps everything

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)  # decode never evicts

    def _fits(self, fill: int) -> bool:
        """Every row's cache (at most fill real tokens) is within reads_at_most: read it all."""
        return fill <= self.reads_at_most

    def _row_fits(self, n: torch.Tensor) -> torch.Tensor:
        """(B,) rows of n real tokens within reads_at_most: they read everything, as they would alone."""
        return n <= self.reads_at_most
