"""Ragged per-head KV cache: only the kept keys/values, with their original positions.

Per TCA layer and per (batch, KV head) the cache holds
  global part: the selected tokens, packed across heads into one (N, D) buffer (CSR offsets);
  tail:        the uncompressed most recent tokens, (B, KV, T, D), the same T for every head;
               slot i holds position t_pos0 + i in every row, and row r's tail is the slots from
               its own first tail position t_first[r] on (earlier slots are invisible to it: -1 in
               tail_positions(); they are padding, or tokens of the row's global region, which
               are visible only where selected into the global part).
Decode appends to the tail; whenever a row's tail holds window + block_size tokens, its oldest
block is compressed to decode_keep[h] tokens per head (ranked by the current query's attention)
and moved to the global part. Rows compress independently, at the same logical step as they would
alone (a left-padded row's tail starts at its own local start), and the shared buffer drops the
slots no row still uses. Memory is what the tensors hold: no masked-out padding, and never more
than a plain cache would hold for the same tokens (the tail's spare capacity is bounded by what
the global part saves; a prompt that stays dense holds exactly a dense cache's bytes). One
exception: in a left-padded batch whose rows are at different phases of their blocks, the shared
tail can hold, per row, up to block_size - 1 unused slots more than the row's padding covers,
which a layer keeping nearly every token may not recover (docs/method.md).

Each layer counts its update(), commit_prefill() and attend() calls, so that the session can
check after every forward that attention really used this cache (integration/hf.py).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .engine import compensation, dispatch
from .engine.plan import DecodeSelection, RaggedCacheView, TokenPlan


class RaggedLayer(DynamicLayer):
    """One attention layer's ragged cache."""

    is_sliding = False
    is_croppable = False
    is_static = False  # static_cache.StaticRaggedLayer: fixed shapes, device counters (graph-captured steps)

    def __init__(self, block_size: int, window: int, backend: dispatch.Backend = "auto") -> None:
        super().__init__()
        self.block_size, self.window, self.backend = block_size, window, backend
        self.seen = 0  # logical length: every token this layer has been given
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # prefill k/v awaiting a plan
        self.g_keys = self.g_values = self.g_pos = self.g_offsets = None
        self.t_keys = self.t_values = None
        self.t_fill = 0  # slots of the tail in use
        self.t_pos0 = 0  # position of tail slot 0
        self.t_first: torch.Tensor | None = None  # (B,) each row's first tail position (>= key_start)
        self._first_host: list[int] | None = None  # t_first on the host, read once when first needed
        self.key_start: torch.Tensor | None = None  # (B,) first non-padding position
        self.decode_keep: torch.Tensor | None = None  # (KV,)
        self._keep_host: tuple[int, ...] | None = None  # decode_keep on the host (keep_host())
        self.calls = CallCounts()
        self.compresses: bool | None = None  # False once known that decode keeps whole blocks
        self.method_state: dict = {}  # a method's per-request state for this layer (e.g. page bounds)
        self.key_bias = None  # the method's key logit bias (engine.plan.KeyBias) set at prefill, applied in decode
        # compensation entries (TokenPlan.compensate): per (row, KV head) the mean key/value of the
        # c_count tokens it dropped; None when the plan folds nothing
        self.c_keys = self.c_values = self.c_count = self.c_heads = None

    # -- transformers Cache protocol ------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill: hold k/v until the attention function commits a plan. Later: append to the tail."""
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            # the cache gathers into preallocated storage (out= ops), which autograd cannot follow
            raise RuntimeError("the ragged cache is for inference: run the model under torch.no_grad() or "
                               "torch.inference_mode() (model.generate() and session.generate() do)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.calls.updates += 1
        if self.t_keys is None:
            self.pending = (key_states, value_states)
        else:
            self._append_tail(key_states, value_states)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks are built over logical positions; TCA layers attend by stored positions.
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.block_size, self.window, self.backend)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a TCA cache cannot be cropped (dropped tokens cannot be restored)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with the TCA cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("num_return_sequences > 1 is not supported with the TCA cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("batch selection is not supported with the TCA cache")

    # -- prefill ----------------------------------------------------------------------------
    def commit_prefill(self, plan: TokenPlan | None, key_start: torch.Tensor, decode_keep: torch.Tensor,
                       keep_host: tuple[int, ...] | None = None) -> None:
        """Store what `plan` keeps of the pending prompt k/v (None = keep everything).

        decode_keep: (KV,) on the cache's device, to commit without a host sync (a host-to-device
        copy waits for the stream: once per layer it held a prefill back); keep_host: the same
        counts on the host, where the caller has them (else read from the device when first
        needed: keep_host())."""
        if self.pending is None:
            raise RuntimeError("commit_prefill without a pending prefill")
        k, v = self.pending
        self.pending = None
        self.calls.commits += 1
        self.key_start = key_start.to(k.device)
        self.decode_keep = decode_keep.to(k.device)
        self._keep_host = None if keep_host is None else tuple(int(x) for x in keep_host)
        self._first_host = None
        self._commit_compensation(plan, k, v)
        self._commit_tail(k, v, self._commit_global(plan, k, v))

    def keep_host(self) -> tuple[int, ...]:
        """decode_keep on the host: as given to commit_prefill, else read from the device once."""
        if self._keep_host is None:
            self._keep_host = tuple(int(x) for x in self.decode_keep.tolist())
        return self._keep_host

    def _commit_compensation(self, plan: TokenPlan | None, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fold each compensating head's dropped prompt tokens (the real tokens of the row's global
        region it does not keep) into its compensation entry."""
        if plan is None or plan.compensate is None:
            self.c_keys = self.c_values = self.c_count = self.c_heads = None
            return
        B, KV, L, D = k.shape
        dev = k.device
        self.c_heads = plan.compensate.to(device=dev, dtype=torch.bool)  # (KV,)
        region = (torch.arange(L, device=dev)[None, :] >= self.key_start[:, None]) & (
            torch.arange(L, device=dev)[None, :] < plan.local_starts().to(dev)[:, None])  # (B, L)
        kept = torch.zeros(B, KV, L + 1, dtype=torch.bool, device=dev)  # slot L: padding entries
        live = torch.arange(plan.kept_idx.shape[-1], device=dev) < plan.kept_len.to(dev)[..., None].long()
        kept.scatter_(2, torch.where(live, plan.kept_idx.to(dev).clamp(max=L), L), True)
        drop = region[:, None, :] & ~kept[..., :L] & self.c_heads[None, :, None]  # (B, KV, L)
        zeros = k.new_zeros(B, KV, D)
        self.c_keys, self.c_values, self.c_count = compensation.fold(
            zeros, zeros.clone(), torch.zeros(B, KV, dtype=torch.float64, device=dev), k, v, drop)

    def _kept_slots(self, plan: TokenPlan | None, k: torch.Tensor) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the kept prompt tokens go in a packed CSR without spare room; sets t_first.

        -> (total kept, shared local start (the smallest row tail start), offsets (B*KV + 1,),
        segment b * KV + h of each kept slot (total,), prompt index of each kept slot (total,))."""
        B, KV = k.shape[:2]
        if plan is None:  # dense: everything goes to the tail; no host sync on this path
            self.t_first = self.key_start.long().clone()
            empty = torch.empty(0, dtype=torch.long, device=k.device)
            return 0, 0, torch.zeros(B * KV + 1, dtype=torch.long, device=k.device), empty, empty
        kept_idx, kept_len = plan.kept_idx, plan.kept_len
        M = kept_idx.shape[-1]
        # each row's tail starts at its own local start; the shared tail at the smallest
        self.t_first = torch.maximum(self.key_start.long(), plan.local_starts().to(k.device).long())
        if plan.kept_total is not None and plan.row_local_start is None:  # no padding: host-known
            total, local_start = plan.kept_total, plan.local_start
        else:  # one host sync for both
            total, local_start = torch.stack([kept_len.sum().long(), self.t_first.min()]).tolist()
        offsets = torch.nn.functional.pad(torch.cumsum(kept_len.flatten().long(), 0), (1, 0))
        slot = torch.arange(total, device=k.device)
        seg = torch.searchsorted(offsets[1:], slot, right=True)  # (b * KV + h) of each slot
        idx = kept_idx.reshape(-1)[seg * M + slot - offsets[seg]]
        return total, local_start, offsets, seg, idx

    def _commit_global(self, plan: TokenPlan | None, k: torch.Tensor, v: torch.Tensor) -> int:
        """Gather the kept tokens straight into the packed CSR; -> the shared local start."""
        KV, D = k.shape[1], k.shape[-1]
        total, local_start, self.g_offsets, seg, idx = self._kept_slots(plan, k)
        bb, hh = seg // KV, seg % KV
        self.g_keys, self.g_values, self.g_pos = _global_store(total, D, k)
        if total:
            torch.ops.aten.index.Tensor_out(k, [bb, hh, idx], out=self.g_keys)
            torch.ops.aten.index.Tensor_out(v, [bb, hh, idx], out=self.g_values)
            # padding never becomes visible, whatever the plan kept
            torch.where(idx >= self.key_start[bb], idx, torch.full_like(idx, -1), out=self.g_pos)
        return local_start

    def _commit_tail(self, k: torch.Tensor, v: torch.Tensor, local_start: int) -> None:
        """The prompt's tokens from the shared local start on become the tail."""
        B, KV, L, D = k.shape
        self.t_fill = L - local_start
        self.t_keys, self.t_values = k.new_empty(2, B, KV, self._tail_capacity(self.t_fill, self.seen, k), D).unbind(0)
        self.t_keys[:, :, : self.t_fill] = k[:, :, local_start:]
        self.t_values[:, :, : self.t_fill] = v[:, :, local_start:]
        self.t_pos0 = local_start

    # -- tail capacity ----------------------------------------------------------------------
    def _tail_capacity(self, need: int, seen: int, like: torch.Tensor) -> int:
        """Tail slots to allocate for `need` tokens once `seen` tokens have been given.

        Room for a whole window + block (no reallocation until the next compression), but never
        so much that this layer would hold more bytes than a dense cache of `seen` tokens: the
        spare slots are paid for by what the global part dropped. A prompt that stays dense gets
        exactly `need` slots and then grows a token at a time, as a plain cache does.
        """
        B, KV, slot = like.shape[0], like.shape[1], 2 * like.shape[-1] * like.element_size()
        global_bytes = self._storage_bytes(("g_keys", "g_values", "g_pos"))  # alignment included
        bound = (B * KV * seen * slot - global_bytes) // (B * KV * slot)
        return max(need, min(self.window + self.block_size, bound))

    def _reallocate_tail(self, cap: int) -> None:
        B, KV, _, D = self.t_keys.shape
        new_k, new_v = self.t_keys.new_empty(2, B, KV, cap, D).unbind(0)  # one allocation
        new_k[:, :, : self.t_fill] = self.t_keys[:, :, : self.t_fill]
        new_v[:, :, : self.t_fill] = self.t_values[:, :, : self.t_fill]
        self.t_keys, self.t_values = new_k, new_v

    # -- decode -----------------------------------------------------------------------------
    def _append_tail(self, k: torch.Tensor, v: torch.Tensor) -> None:
        Q = k.shape[-2]
        need = self.t_fill + Q
        if need > self.t_keys.shape[2]:
            self._reallocate_tail(self._tail_capacity(need, self.seen + Q, k))
        self.t_keys[:, :, self.t_fill : need] = k
        self.t_values[:, :, self.t_fill : need] = v
        self.t_fill = need

    def tail_positions(self) -> torch.Tensor:
        """(B, T) original positions of the tail slots, -1 where a slot is not in the row's tail
        (padding, or a token of the row's global region: a left-padded row's tail starts later)."""
        pos = torch.arange(self.t_pos0, self.t_pos0 + self.t_fill, device=self.t_keys.device)
        pos = pos[None, :].expand(self.t_first.shape[0], -1)
        return torch.where(pos >= self.t_first[:, None], pos, torch.full_like(pos, -1))

    def _tail_firsts(self) -> list[int]:
        """Each row's first tail position on the host (one sync per request, then kept up to date)."""
        if self._first_host is None:
            self._first_host = [int(x) for x in self.t_first.tolist()]
        return self._first_host

    def view(self, q_pos: torch.Tensor) -> RaggedCacheView:
        """The cache as queries at positions q_pos (B, Q) see it (references to the buffers, no copy)."""
        comp = (self.c_keys, self.c_values, compensation.log_weight(self.c_count)) if self.c_keys is not None else ()
        return RaggedCacheView(
            q_pos, self.g_keys, self.g_values, self.g_pos, self.g_offsets,
            self.t_keys[:, :, : self.t_fill], self.t_values[:, :, : self.t_fill], self.tail_positions(), *comp,
        )

    def attend(self, q: torch.Tensor, scaling: float, selection: DecodeSelection | None = None) -> torch.Tensor:
        """Decode/continuation attention of new queries over the cache (only the tail pages a
        method's `selection` lists, if any), then compression."""
        self.calls.decodes += 1
        Q = q.shape[2]
        q_pos = torch.arange(self.seen - Q, self.seen, device=q.device)[None, :].expand(q.shape[0], Q)
        out, lse = dispatch.ragged_decode(q, self.view(q_pos), scaling, backend=self.backend, selection=selection,
                                          key_bias=self.key_bias)
        full = self.window + self.block_size
        if self.compresses is None and self.t_fill >= full:  # t_fill: the longest row tail
            # every head keeping whole blocks gains nothing and would add positions: stay dense
            self.compresses = any(x < self.block_size for x in self.keep_host())  # once per request
        if self.compresses and self.t_fill >= full:
            firsts = self._tail_firsts()
            while rows := [r for r, f in enumerate(firsts) if self.seen - f >= full]:
                self._compress_oldest_block(rows, q[:, :, -1], lse[:, :, -1], scaling)
            self._drop_unused_slots()
        return out

    def _compress_oldest_block(self, rows: list[int], q_last: torch.Tensor, lse_last: torch.Tensor, scaling: float) -> None:
        """Move the oldest block of the tail of each row in `rows` to the global part, keeping
        decode_keep[h] tokens per head; the other rows keep nothing and their tails stay."""
        b = self.block_size
        B, KV, _, D = self.t_keys.shape
        g = q_last.shape[1] // KV
        firsts = self._tail_firsts()
        dev = self.t_keys.device
        chosen = [r in rows for r in range(B)]
        first_slot = torch.tensor([firsts[r] - self.t_pos0 if chosen[r] else 0 for r in range(B)], device=dev)
        comp = torch.tensor(chosen, device=dev)  # (B,) rows compressing now
        slots = first_slot[:, None] + torch.arange(b, device=dev)  # (B, b) the row's oldest block
        gidx = slots[:, None, :, None].expand(B, KV, b, D)
        blk_k, blk_v = torch.gather(self.t_keys, 2, gidx), torch.gather(self.t_values, 2, gidx)  # (B, KV, b, D)
        logits = torch.einsum("bkgd,bknd->bkgn", q_last.view(B, KV, g, D).float(), blk_k.float()) * scaling
        probs = torch.exp(logits - lse_last.view(B, KV, g, 1)).mean(2)  # (B, KV, b) GQA-averaged
        pos = self.t_pos0 + slots  # (B, b): all in the row's tail for the compressing rows
        t_max = max(self.keep_host(), default=0)
        top = torch.topk(probs, t_max, dim=-1).indices  # (B, KV, t_max)
        keep = torch.arange(t_max, device=dev)[None, None, :] < self.decode_keep[None, :, None]
        keep = keep & comp[:, None, None]  # (B, KV, t_max)
        if self.c_keys is not None:  # what the compensating heads drop of the block folds into their entry
            kept = torch.zeros(B, KV, b, dtype=torch.bool, device=dev).scatter_(2, top, keep)
            drop = comp[:, None, None] & self.c_heads[None, :, None] & ~kept  # (B, KV, b)
            self.c_keys, self.c_values, self.c_count = compensation.fold(
                self.c_keys, self.c_values, self.c_count, blk_k, blk_v, drop)
        if t_max > 0:
            self._append_global(
                torch.gather(blk_k, 2, top[..., None].expand(B, KV, t_max, D)),
                torch.gather(blk_v, 2, top[..., None].expand(B, KV, t_max, D)),
                torch.gather(pos[:, None, :].expand(B, KV, b), 2, top),
                keep,
            )
        # the block leaves the row's tail
        for r in rows:
            firsts[r] += b
        self.t_first = self.t_first + comp.long() * b

    def _drop_unused_slots(self) -> None:
        """Drop the leading tail slots that no row's tail uses any more: shift left in place, or
        into a smaller tail when the global part grew so much that the spare slots would hold more
        than a dense cache."""
        m = min(self._tail_firsts()) - self.t_pos0
        if m <= 0:
            return
        B, KV, _, D = self.t_keys.shape
        rest = self.t_fill - m
        cap = min(self.t_keys.shape[2], self._tail_capacity(rest, self.seen, self.t_keys))
        old_k, old_v = self.t_keys[:, :, m : self.t_fill], self.t_values[:, :, m : self.t_fill]
        if cap < self.t_keys.shape[2]:
            self.t_keys, self.t_values = self.t_keys.new_empty(2, B, KV, cap, D).unbind(0)
        else:
            old_k, old_v = old_k.clone(), old_v.clone()
        self.t_keys[:, :, :rest] = old_k
        self.t_values[:, :, :rest] = old_v
        self.t_fill, self.t_pos0 = rest, self.t_pos0 + m

    def _append_global(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> None:
        """Append k/v (B, KV, t, D) where keep (B, KV, t) to each head's packed segment."""
        S = keep.shape[0] * keep.shape[1]
        add = keep.reshape(S, -1).sum(-1)  # (S,)
        old_len = self.g_offsets[1:] - self.g_offsets[:-1]
        new_len = old_len + add
        new_off = torch.nn.functional.pad(torch.cumsum(new_len, 0), (1, 0))
        N_new = int(new_off[-1])
        seg = torch.repeat_interleave(torch.arange(S, device=add.device), old_len)
        old_dst = torch.arange(self.g_pos.shape[0], device=add.device) - self.g_offsets[seg] + new_off[seg]
        flat_keep = keep.reshape(-1)
        seg_new = torch.arange(S, device=add.device)[:, None].expand(S, keep.shape[-1]).reshape(-1)[flat_keep]
        rank = (torch.cumsum(keep.reshape(S, -1).long(), -1) - 1).reshape(-1)[flat_keep]
        new_dst = new_off[seg_new] + old_len[seg_new] + rank
        D = k.shape[-1]
        keys, values, gp = _global_store(N_new, D, self.g_keys)
        for buf, old, fresh in ((keys, self.g_keys, k), (values, self.g_values, v), (gp, self.g_pos, pos)):
            buf[old_dst] = old
            buf[new_dst] = fresh.reshape(-1, *buf.shape[1:])[flat_keep].to(buf.dtype)
        self.g_keys, self.g_values, self.g_pos, self.g_offsets = keys, values, gp, new_off

    # -- accounting -------------------------------------------------------------------------
    _KV_TENSORS = ("g_keys", "g_values", "g_pos", "t_keys", "t_values", "c_keys", "c_values")
    _INDEX_TENSORS = ("g_offsets", "key_start", "t_first", "decode_keep", "c_count", "c_heads")

    def _storage_bytes(self, names: tuple[str, ...]) -> int:
        tensors = [t for t in (getattr(self, n) for n in names) if t is not None]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    def kv_bytes(self) -> int:
        """Bytes of every allocation holding keys, values and kept positions (tail capacity and
        alignment included): what grows with the tokens."""
        return self._storage_bytes(self._KV_TENSORS)

    def index_bytes(self) -> int:
        """Bytes of the per-(row, head) index arrays: CSR offsets, padding starts, tail starts,
        decode keep counts (O(batch x KV heads) integers, reported apart from the KV)."""
        return self._storage_bytes(self._INDEX_TENSORS)

    def kept_tokens(self) -> int:
        """Key/value slots in use, summed over (batch, KV head)."""
        if self.t_keys is None:
            return 0
        B, KV = self.t_keys.shape[:2]
        comp = int((self.c_count > 0).sum()) if self.c_count is not None else 0  # compensation entries held
        return int(self.g_pos.shape[0]) + B * KV * self.t_fill + comp

    def dense_tokens(self) -> int:
        if self.t_keys is None:
            return 0
        B, KV = self.t_keys.shape[:2]
        return B * KV * self.seen

    def dense_bytes(self) -> int:
        if self.t_keys is None:
            return 0
        return 2 * self.dense_tokens() * self.t_keys.shape[-1] * self.t_keys.element_size()

    def slot_bytes(self) -> int:
        """Bytes of one key/value slot (key + value) of this layer."""
        return 2 * self.t_keys.shape[-1] * self.t_keys.element_size() if self.t_keys is not None else 0

    def kept_tokens_per_row(self) -> torch.Tensor:
        """(B,) key/value slots of non-padding tokens in use per batch row, summed over KV heads."""
        B, KV = self.t_keys.shape[:2]
        seg_len = self.g_offsets[1:] - self.g_offsets[:-1]  # (B * KV,)
        seg = torch.repeat_interleave(torch.arange(B * KV, device=seg_len.device), seg_len)
        glob = torch.zeros(B * KV, dtype=torch.long, device=seg_len.device)
        glob.index_add_(0, seg, (self.g_pos >= 0).long())
        tail = (self.tail_positions() >= 0).sum(-1) * KV
        comp = (self.c_count > 0).sum(-1) if self.c_count is not None else 0
        return glob.view(B, KV).sum(-1) + tail + comp

    def dense_tokens_per_row(self) -> torch.Tensor:
        """(B,) slots a plain cache would hold for each row's non-padding tokens."""
        KV = self.t_keys.shape[1]
        return (self.seen - self.key_start) * KV


class CallCounts:
    """How often transformers and the attention function touched a layer (for the session's check)."""

    __slots__ = ("updates", "commits", "decodes")

    def __init__(self) -> None:
        self.updates = self.commits = self.decodes = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.updates, self.commits, self.decodes


def _global_store(n: int, d: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values (n, d) like `like` and int64 positions (n,), as views of ONE allocation.

    The caching allocator leaves up to 1 MiB of unsplit slack per odd-sized block; one block
    per layer instead of three keeps that out of the memory the cache really costs.
    """
    kv = n * d * like.element_size()
    kv_aligned = -(-kv // 256) * 256
    buf = torch.empty(2 * kv_aligned + 8 * n, dtype=torch.uint8, device=like.device)
    keys = buf[:kv].view(like.dtype).view(n, d)
    values = buf[kv_aligned : kv_aligned + kv].view(like.dtype).view(n, d)
    return keys, values, buf[2 * kv_aligned :].view(torch.long)


class RaggedCache(Cache):
    """A transformers Cache whose full-attention layers are ragged TCA layers."""

    def __init__(self, kinds: list[str], block_size: int, window: int, sliding_window: int | None = None,
                 backend: dispatch.Backend = "auto") -> None:
        layers = []
        for kind in kinds:
            if kind == "full":
                layers.append(self._full_layer(block_size, window, backend))
            elif kind == "sliding":
                layers.append(self._sliding_layer(sliding_window))
            else:
                raise ValueError(f"unknown layer kind {kind!r}")
        super().__init__(layers=layers)

    def _full_layer(self, block_size: int, window: int, backend: dispatch.Backend) -> RaggedLayer:
        return RaggedLayer(block_size, window, backend)

    def _sliding_layer(self, sliding_window: int | None):
        return DynamicSlidingWindowLayer(sliding_window=sliding_window)

    def tca_layers(self) -> list[RaggedLayer]:
        return [l for l in self.layers if isinstance(l, RaggedLayer)]

    def kv_bytes(self) -> int:
        """Bytes actually held by every layer of this cache."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, RaggedLayer):
                total += layer.kv_bytes()
            elif layer.is_initialized and layer.keys is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def index_bytes(self) -> int:
        """Bytes of the ragged layers' index arrays (reported apart from the KV)."""
        return sum(layer.index_bytes() for layer in self.tca_layers())

    def dense_kv_bytes(self) -> int:
        """Bytes a plain DynamicCache would hold for the same tokens (sliding layers as they are)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, RaggedLayer):
                total += layer.dense_bytes()
            elif layer.is_initialized and layer.keys is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def per_row(self) -> list[dict[str, float]]:
        """Per batch row, over non-padding tokens: kept_fraction (TCA layers), kv_bytes and
        dense_kv_bytes (what this row's slots take; sliding layers shared equally by the rows)."""
        tca = [l for l in self.tca_layers() if l.t_keys is not None]
        others = [l for l in self.layers if not isinstance(l, RaggedLayer) and l.is_initialized and l.keys is not None]
        if not tca:
            return []
        B = tca[0].t_keys.shape[0]
        kept = sum(l.kept_tokens_per_row().double() for l in tca)
        dense = sum(l.dense_tokens_per_row().double() for l in tca)
        kept_b = sum(l.kept_tokens_per_row().double() * l.slot_bytes() for l in tca)
        dense_b = sum(l.dense_tokens_per_row().double() * l.slot_bytes() for l in tca)
        shared = sum(l.keys.nbytes + l.values.nbytes for l in others) / B
        return [{"kept_fraction": float(kept[r] / dense[r]) if dense[r] else 1.0,
                 "kv_bytes": int(kept_b[r] + shared), "dense_kv_bytes": int(dense_b[r] + shared)} for r in range(B)]

    def kept_fraction(self) -> float:
        """Kept key/value slots over the slots full attention would hold, TCA layers only."""
        kept = sum(l.kept_tokens() for l in self.tca_layers())
        dense = sum(l.dense_tokens() for l in self.tca_layers())
        return kept / dense if dense else 1.0
