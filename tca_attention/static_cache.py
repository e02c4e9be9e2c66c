"""The ragged cache in static mode: decode steps a CUDA graph can capture and replay.

A StaticRaggedLayer holds what a RaggedLayer holds (a global part packed per (row, KV head), then a
tail), with the same decode semantics (decode compression moves a row's oldest tail block to its
global segments, keeping decode_keep[h] tokens per head, ranked by the step's attention), but every
buffer is sized once, at commit_prefill, for the whole request (prompt + max_new_tokens):

  global part: each (row, head) segment gets room for what decode compression can add to it
               (n_comp * decode_keep[h] slots, n_comp the most blocks a row can compress in the
               request); CSR offsets fixed after prefill, a device fill count per segment, unused
               slots at position -1 (the decode kernel masks them; it reads a segment's room too).
  tail:        a ring of T slots shared by the rows: position p lives in slot (p - t_pos0) mod T,
               with its position per row in t_pos (B, T) (-1: empty, padding, or no longer in the
               row's tail). T covers the longest row tail: window + block_size once compression
               runs (a longer prompt tail is compressed at the first decode step, which then moves
               the ring into one of window + block_size slots), or the
               whole prompt tail + max_new_tokens when no head ever drops a token (full budget).

A decode step (one token) writes k/v at the slot of a device position counter (engine/ring_append:
one Triton launch on a GPU), runs the decode kernel over the whole preallocated buffers (q positions
from the counter), then one masked compression pass: rows whose tail is full compress
(torch.where/scatter into the room, a dump slot for the others). Nothing is allocated for the cache,
nothing syncs with the host, no branch reads a tensor. Host-side, the step reads only values that
stay fixed across the steps a graph replays: the first decode step (run eagerly) may compress
several blocks of a long dense prompt tail at once, and `compress_pass` (default on) lets a runner
capture a second graph without the compression pass, for the steps at which the host schedule
(`compress_steps`) says no row of any layer compresses. See docs/decode.md.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer

from .engine import dispatch
from .engine.plan import TokenPlan
from .ragged_cache import RaggedCache, RaggedLayer, _global_store


class StaticRaggedLayer(RaggedLayer):
    """One attention layer's ragged cache with storage for prompt + max_new_tokens, static decode."""

    _INDEX_TENSORS = RaggedLayer._INDEX_TENSORS + ("t_pos", "g_fill", "next_pos", "q_pos")
    is_static = True

    def __init__(self, block_size: int, window: int, backend: dispatch.Backend = "auto", max_new_tokens: int = 1) -> None:
        super().__init__(block_size, window, backend)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        self.prompt_len = 0
        self.next_pos: torch.Tensor | None = None  # (1,) int64: tokens given so far = next position
        self.q_pos: torch.Tensor | None = None  # (1,) int64: the position of the step's token (its query's)
        self.t_pos: torch.Tensor | None = None  # (B, T) int64 position of each tail slot per row, -1 = none
        self.g_fill: torch.Tensor | None = None  # (B*KV,) int64 slots in use of each global segment
        self.n_global = 0  # global slots, room included (= g_offsets[-1]); slot n_global is a dump slot
        self.catchup = 0  # compression passes of the first decode step
        self.t_max = 0  # the largest decode_keep
        self.decoded = False  # the first decode step ran
        self.compress_pass = True  # run the (masked) compression pass in decode steps after the first
        self._store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # global buffers + dump slot

    def reset(self) -> None:
        self.__init__(self.block_size, self.window, self.backend, self.max_new_tokens)

    # -- prefill ----------------------------------------------------------------------------
    def commit_prefill(self, plan: TokenPlan | None, key_start: torch.Tensor, decode_keep: torch.Tensor,
                       keep_host: tuple[int, ...] | None = None) -> None:
        if plan is not None and plan.compensate is not None:
            raise NotImplementedError("the static (graph-captured) cache has no compensation entries "
                                      "(TokenPlan.compensate, RazorAttention): use the dynamic cache")
        super().commit_prefill(plan, key_start, decode_keep, keep_host)

    def _commit_global(self, plan: TokenPlan | None, k: torch.Tensor, v: torch.Tensor) -> int:
        B, KV, L, D = k.shape
        b, w = self.block_size, self.window
        total, local_start, dyn_off, seg, idx = self._kept_slots(plan, k)
        fill = L - local_start  # the longest row tail
        keep = self.keep_host()
        self.compresses = any(x < b for x in keep)
        self.t_max = max(keep, default=0) if self.compresses else 0
        # blocks a row can compress in the request: a row compresses its oldest block whenever its tail
        # reaches w + b tokens and keeps w, so with at most `fill + max_new_tokens` tail tokens ever it
        # compresses at most (fill + max_new_tokens - w) // b blocks (the room every segment needs)
        n_comp = max(0, (fill + self.max_new_tokens - w) // b) if self.compresses else 0
        self.catchup = max(0, (fill + 1 - (w + b)) // b + 1) if self.compresses else 0
        kept = dyn_off[1:] - dyn_off[:-1]  # (B*KV,)
        room = n_comp * self.decode_keep.long().repeat(B)  # (B*KV,) spare slots per segment
        self.g_offsets = torch.nn.functional.pad(torch.cumsum(kept + room, 0), (1, 0))
        self.n_global = total + B * n_comp * sum(keep)
        gk, gv, gp = _global_store(self.n_global + 1, D, k)
        gk.zero_(), gv.zero_(), gp.fill_(-1)
        if total:
            bb, hh = seg // KV, seg % KV
            dst = torch.arange(total, device=k.device) + (self.g_offsets[seg] - dyn_off[seg])
            gk[dst] = k[bb, hh, idx]
            gv[dst] = v[bb, hh, idx]
            gp[dst] = torch.where(idx >= self.key_start[bb], idx, torch.full_like(idx, -1))
        self._store = (gk, gv, gp)
        N = self.n_global
        self.g_keys, self.g_values, self.g_pos = gk[:N], gv[:N], gp[:N]
        self.g_fill = kept.clone()
        # per-step constants: block offsets, kept ranks and which ranks each head keeps
        dev = k.device
        self._block_ar = torch.arange(b, device=dev)
        self._rank = torch.arange(self.t_max, device=dev)
        self._rank_ok = (self._rank[None, :] < self.decode_keep[:, None])[None]  # (1, KV, t_max)
        self._dump = torch.full((1,), N, dtype=torch.long, device=dev)
        return local_start

    def _commit_tail(self, k: torch.Tensor, v: torch.Tensor, local_start: int) -> None:
        B, KV, L, D = k.shape
        b, w = self.block_size, self.window
        fill = L - local_start
        if self.compresses:
            T = min(max(fill + 1, w + b), fill + self.max_new_tokens)
        else:
            T = fill + self.max_new_tokens
        self.t_keys, self.t_values = k.new_zeros(2, B, KV, T, D).unbind(0)
        self.t_keys[:, :, :fill] = k[:, :, local_start:]
        self.t_values[:, :, :fill] = v[:, :, local_start:]
        pos = torch.arange(local_start, local_start + T, device=k.device)[None, :]
        self.t_pos = torch.where((pos < L) & (pos >= self.t_first[:, None]), pos, torch.full_like(pos, -1))
        self.t_first = self.t_first.clone()  # updated in place by decode steps
        self.t_fill, self.t_pos0 = T, local_start
        self.prompt_len = L
        self.next_pos = torch.full((1,), L, dtype=torch.long, device=k.device)
        self.q_pos = torch.full((1,), L - 1, dtype=torch.long, device=k.device)

    # -- decode -----------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.t_keys is None:  # prefill
            return super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] != 1:
            raise ValueError(f"a static ragged cache decodes one token per step, got {key_states.shape[-2]}")
        if self.seen >= self.prompt_len + self.max_new_tokens:
            raise RuntimeError(f"the static cache holds a prompt + {self.max_new_tokens} new tokens; it is full")
        self.calls.updates += 1
        # k/v and the position into the ring's slot, q_pos <- next_pos, next_pos += 1 (one launch on a GPU)
        dispatch.ring_append(self.t_keys, self.t_values, key_states, value_states, self.next_pos, self.t_pos0,
                             self.t_pos, self.q_pos, backend=self.backend)
        self.seen += 1
        return key_states, value_states

    def tail_positions(self) -> torch.Tensor:
        return self.t_pos

    def attend(self, q: torch.Tensor, scaling: float, selection=None) -> torch.Tensor:
        """Attention of the step's query over the whole preallocated cache, then (masked) compression."""
        self.calls.decodes += 1
        B, _, Q, _ = q.shape
        if Q != 1:
            raise ValueError(f"a static ragged cache decodes one token per step, got {Q} queries")
        q_pos = self.q_pos.view(1, 1).expand(B, 1)
        out, lse = dispatch.ragged_decode(q, self.view(q_pos), scaling, backend=self.backend, selection=selection,
                                          key_bias=self.key_bias)
        if self.compresses and (self.compress_pass or not self.decoded):
            for _ in range(1 if self.decoded else self.catchup):
                self._compress_masked(q[:, :, -1], lse[:, :, -1], scaling)
            if not self.decoded and self.t_keys.shape[2] > self.window + self.block_size:
                self._shrink_ring()
        self.decoded = True
        return out

    def _shrink_ring(self) -> None:
        """After the first step's catch-up, every row's tail is shorter than window + block_size:
        move the ring's last window + block_size positions into a ring of that size (once, in the
        eager first step; no host read: the slots follow from host ints, the ring has not wrapped)."""
        B, KV, T, D = self.t_keys.shape
        T2 = self.window + self.block_size
        lo = self.seen - T2 - self.t_pos0  # old slots [lo, lo + T2) hold positions seen - T2 .. seen - 1
        order = torch.remainder(torch.arange(self.seen - T2, self.seen, device=self.t_keys.device) - self.t_pos0, T2)
        keys, values = self.t_keys.new_zeros(2, B, KV, T2, D).unbind(0)
        keys[:, :, order] = self.t_keys[:, :, lo : lo + T2]
        values[:, :, order] = self.t_values[:, :, lo : lo + T2]
        pos = torch.full((B, T2), -1, dtype=torch.long, device=self.t_pos.device)
        pos[:, order] = self.t_pos[:, lo : lo + T2]
        self.t_keys, self.t_values, self.t_pos, self.t_fill = keys, values, pos, T2

    def _compress_masked(self, q_last: torch.Tensor, lse_last: torch.Tensor, scaling: float) -> None:
        """One compression pass: every row whose tail holds window + block_size tokens moves its
        oldest block to its global segments (decode_keep[h] tokens per head, ranked by the query's
        attention); other rows write to the dump slot and keep their tails. Same choice as
        RaggedLayer._compress_oldest_block, without host reads."""
        b = self.block_size
        B, KV, T, D = self.t_keys.shape
        g = q_last.shape[1] // KV
        comp = (self.next_pos - self.t_first) >= self.window + b  # (B,) rows compressing now
        bpos = self.t_first[:, None] + self._block_ar  # (B, b) positions of each row's oldest block
        slots = torch.remainder(bpos - self.t_pos0, T)  # (B, b)
        gidx = slots[:, None, :, None].expand(B, KV, b, D)
        blk_k, blk_v = torch.gather(self.t_keys, 2, gidx), torch.gather(self.t_values, 2, gidx)  # (B, KV, b, D)
        logits = torch.einsum("bkgd,bknd->bkgn", q_last.view(B, KV, g, D).float(), blk_k.float()) * scaling
        probs = torch.exp(logits - lse_last.view(B, KV, g, 1)).mean(2)  # (B, KV, b) GQA-averaged
        if self.t_max > 0:
            t = self.t_max
            top = torch.topk(probs, t, dim=-1).indices  # (B, KV, t)
            keep = self._rank_ok & comp[:, None, None]  # (B, KV, t)
            base = (self.g_offsets[:-1] + self.g_fill).view(B, KV, 1)
            dst = torch.where(keep, base + self._rank, self._dump).flatten()  # (B*KV*t,)
            gk, gv, gp = self._store
            gk.index_copy_(0, dst, torch.gather(blk_k, 2, top[..., None].expand(B, KV, t, D)).reshape(-1, D))
            gv.index_copy_(0, dst, torch.gather(blk_v, 2, top[..., None].expand(B, KV, t, D)).reshape(-1, D))
            gp.index_copy_(0, dst, torch.gather(bpos[:, None, :].expand(B, KV, b), 2, top).flatten())
            self.g_fill.add_(keep.sum(-1).flatten())
        # the block leaves the compressing rows' tails
        self.t_pos.scatter_(1, slots, self.t_pos.gather(1, slots).masked_fill(comp[:, None], -1))
        self.t_first.add_(comp.long() * b)

    # -- host side (outside decode steps) ---------------------------------------------------
    def compress_steps(self, n_steps: int) -> list[bool]:
        """For decode steps 1..n_steps, whether some row of this layer compresses at that step
        (from each row's tail start after prefill: one host read). Call before decoding."""
        if self.decoded:
            raise RuntimeError("compress_steps is a schedule from the prefill state: call it before decoding")
        if not self.compresses:
            return [False] * n_steps
        firsts = [int(x) for x in self.t_first.tolist()]
        full, out = self.window + self.block_size, []
        for s in range(1, n_steps + 1):
            seen, hit = self.prompt_len + s, False
            for r, f in enumerate(firsts):
                while seen - f >= full:
                    f, hit = f + self.block_size, True
                firsts[r] = f
            out.append(hit)
        return out

    def sync_host(self) -> None:
        """Host counters from the device ones (after graph replays, which run no Python)."""
        if self.next_pos is not None:
            self.seen = int(self.next_pos)
            self.decoded = self.seen > self.prompt_len

    def kept_tokens(self) -> int:
        if self.t_keys is None:
            return 0
        KV = self.t_keys.shape[1]
        return int((self.g_pos >= 0).sum()) + KV * int((self.t_pos >= 0).sum())


class StaticWindowLayer(StaticLayer):
    """A sliding-window layer as a ring of `size` slots: position p lives in slot p % size.

    transformers' StaticSlidingWindowLayer rolls its buffer every decode step with an index tensor
    made on the host (a host-to-device copy a CUDA graph cannot capture) and branches on a host
    count; a ring writes one slot in place (engine/ring_append at a device counter) and needs no branch.
    Decode masks must come from the static runner (adapter.static_decode_mask), which knows the
    ring: transformers' own mask for a decode step would assume slot j holds position offset + j.
    size: the window, or less when the whole request fits (prompt + new tokens < window).
    """

    is_sliding = True
    is_croppable = False

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a window layer needs size >= 1, got {size}")
        super().__init__(max_cache_len=size)
        self.prefilled = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new, size = key_states.shape[-2], self.max_cache_len
        if self.prefilled and n_new != 1:
            raise ValueError(f"a static window layer decodes one token per step, got {n_new}")
        if not self.prefilled:  # the prompt: attend over it all, keep its last `size` tokens
            self.prefilled = True
            n = min(n_new, size)
            slots = torch.arange(n_new - n, n_new, device=self.device) % size
            self.keys.index_copy_(2, slots, key_states[:, :, n_new - n :])
            self.values.index_copy_(2, slots, value_states[:, :, n_new - n :])
            self.cumulative_length.add_(n_new)
            return key_states, value_states
        dispatch.ring_append(self.keys, self.values, key_states, value_states, self.cumulative_length)  # slot p % size
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.prefilled:
            raise RuntimeError("a static window layer's decode masks come from the static runner "
                               "(integration/static_decode.py), not from transformers")
        return query_length, 0

    def reset(self) -> None:
        super().reset()
        self.prefilled = False


class StaticRaggedCache(RaggedCache):
    """A RaggedCache whose layers are static: StaticRaggedLayer for full-attention layers,
    StaticWindowLayer (a ring of the window's size) for sliding-window layers."""

    def __init__(self, kinds: list[str], block_size: int, window: int, sliding_window: int | None = None,
                 backend: dispatch.Backend = "auto", *, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        super().__init__(kinds, block_size, window, sliding_window, backend)

    def _full_layer(self, block_size: int, window: int, backend: dispatch.Backend) -> StaticRaggedLayer:
        return StaticRaggedLayer(block_size, window, backend, self.max_new_tokens)

    def _sliding_layer(self, sliding_window: int | None) -> StaticWindowLayer:
        if not sliding_window:
            raise ValueError("a sliding-window layer needs the config's sliding_window")
        return StaticWindowLayer(sliding_window)

    def set_compress_pass(self, on: bool) -> None:
        """Whether decode steps after the first run the masked compression pass (a host switch)."""
        for layer in self.tca_layers():
            layer.compress_pass = on

    def compress_steps(self, n_steps: int) -> list[bool]:
        """Decode steps 1..n_steps at which some row of some layer compresses (host schedule)."""
        out = [False] * n_steps
        for layer in self.tca_layers():
            if layer.t_keys is not None:
                out = [a or b for a, b in zip(out, layer.compress_steps(n_steps))]
        return out

    def sync_host(self) -> None:
        """Host counters from the device ones (after graph replays, which run no Python)."""
        for layer in self.tca_layers():
            layer.sync_host()
