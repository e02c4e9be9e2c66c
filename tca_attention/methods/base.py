"""What a method (policy) is: it plans what each KV head keeps and attends to; the engine runs it.

A method answers, per full-attention layer:
  plan()          at prefill: a TokenPlan (kept tokens per KV head + causal window; the ragged
                  cache keeps just those), a BlockPlan (key blocks per query block; the cache keeps
                  everything), or None (dense attention, everything kept);
  decode_keep()   what the ragged cache keeps of each block it compresses in decode (eviction);
  select_decode() at each decode step, which pages of the cache the new queries read (None: all);
                  supports_static_decode() says whether that per-step work is graph-safe;
  key_bias()      optionally, a key logit bias (engine.plan.KeyBias) every executor adds to a few
                  keys' logits at this layer, prefill and decode (the attention calibrators, compose.py);
and optionally calibrates once, through a Probe, into plain JSON state tied to the model
(methods/state.py). Per-head kinds (dense / streaming / sparse heads) are plans too (head_kinds.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Protocol, Union

import torch
from torch import nn

from ..engine.dispatch import Backend
from ..engine.plan import KeyBias, TokenPlan

if TYPE_CHECKING:
    from ..ragged_cache import RaggedLayer

# observer(layer_idx, q, k, v, scaling): q (B, H, L, D), k/v (B, KV, L, D) after rotary
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], None]
# gradient observer(layer_idx, q, k, v, scaling, d_out): d_out (B, L, H, D) = dloss / d(attention output)
GradientObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor], None]
# override(layer_idx, q, k, v, scaling) -> the layer's attention output (B, L, H, D) in its place, or
# None to keep plain attention; q (B, H, L, D), k/v (B, KV, L, D) after rotary, causal, no padding
Override = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], Union[torch.Tensor, None]]
Plan = Union[TokenPlan, "BlockPlan"]  # noqa: F821 - engine.plan.BlockPlan


class Probe(Protocol):
    """A model as a calibration sees it; lent by the integration (integration.probe.ModelProbe),
    so that methods never import the integration."""

    model: nn.Module

    def observe(self, input_ids: torch.Tensor, observer: Observer) -> None:
        """One dense forward of input_ids (1, L), calling observer on every full-attention layer."""

    def observe_gradients(self, input_ids: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor],
                          observer: GradientObserver) -> None:
        """One dense forward and backward of loss(logits (1, L, V)); observer gets every full layer's
        q, k, v and the loss gradient with respect to its attention output (MoA's profile)."""

    def hidden_states(self, input_ids: torch.Tensor, override: Override | None = None) -> torch.Tensor:
        """The last hidden states (1, L, hidden) of a forward of input_ids (1, L) whose full-attention
        layers output override(...) (plain attention where it returns None, or without one). Gradients
        flow (to whatever the override uses); the model's weights are the caller's to freeze."""

    def evaluate(self, input_ids: torch.Tensor, method: "Method") -> dict[str, float]:
        """One forward of input_ids (1, L) under `method` (no cache): {"nll": mean next-token negative
        log-likelihood, "entropy": mean entropy of the next-token distributions} (calibrations that search)."""

    def answer_logits(self, prompts: Sequence[Sequence[int]], answer_starts: Sequence[int],
                      method: "Method | None") -> list[torch.Tensor]:
        """Prompts under `method` (None: dense) with its cache, as generation runs them: each prompt's
        ids[:start] prefilled, then its answer teacher-forced one token at a time; -> per prompt the
        (len - start, V) logits predicting each answer token (TCA's layer probe)."""


@dataclass(frozen=True)
class HeadGroup:
    """The attention heads of a layer as a plan that combines them sees them (Method.combines_heads),
    lent by the integration so that methods never import torch.distributed. This class is one
    process holding every head (ONE_PROCESS: sum and gather return their argument); under tensor
    parallelism (integration/tensor_parallel.py) `world` processes hold equal contiguous slices of
    the heads, this one the `rank`-th, and sum / gather run over them (every process must call them,
    in the same order)."""

    rank: int = 0
    world: int = 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t, a sum over this process's heads -> the same sum over every head of the layer."""
        return t

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """t, indexed by this process's heads along dim -> indexed by every head (the model's order)."""
        return t

    def own(self, whole: torch.Tensor, dim: int) -> torch.Tensor:
        """The slice of `whole` (every head along dim) that belongs to this process's heads."""
        return whole if self.world == 1 else whole.chunk(self.world, dim)[self.rank]


ONE_PROCESS = HeadGroup()


class Method(ABC):
    """A sparse-attention policy. Executors and the cache are shared; a method only plans.

    block_size/window: the ragged cache's geometry (the causal window every query keeps, and the
    block decode compresses at a time). is_dense: plain attention everywhere (SDPA and a
    DynamicCache; no hooks on the hot path): the Dense method, the reference of every comparison.
    """

    name: str
    block_size: int
    window: int
    is_dense: bool = False
    # report() keys whose values count heads (numbers, or dicts of numbers): under tensor
    # parallelism each rank counts its own heads and the session sums them over the ranks
    report_sums: ClassVar[tuple[str, ...]] = ()
    # plan() combines the heads of a layer (scores summed or averaged over heads into one selection,
    # heads ranked against each other): it then takes a keyword `heads: HeadGroup` (the session
    # lends it; ONE_PROCESS by default) and runs every such sum or ranking through it, so that a
    # tensor-parallel rank, which holds only its own heads, chooses as one process does
    combines_heads: ClassVar[bool] = False

    def split_heads_refusal(self) -> str | None:
        """Why this method cannot run on a tensor-parallel rank holding only some of the heads (e.g.
        its decode selection votes over every head of a layer, with no HeadGroup to do it through),
        or None. The session refuses such a method with this reason rather than choose otherwise."""
        return None

    @abstractmethod
    def plan(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor, scaling: float,
        *, backend: Backend = "auto", padded: bool = True,
    ) -> Plan | None:
        """q (B, H, L, D), k (B, KV, L, D) after rotary; key_start (B,) first non-padding key.

        backend: kernels to use where the method has them; padded=False promises key_start == 0
        (the caller knows it without reading the tensor), which lets a plan size things on the host.
        """

    @abstractmethod
    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        """(KV,) tokens each head keeps when decode compresses one block (block_size: keep all)."""

    def key_bias(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor,
                 scaling: float) -> KeyBias | None:
        """The key logit bias of this layer for this prompt (q (B, H, L, D), k (B, KV, L, D) after
        rotary, at prefill), applied at prefill and at every decode step over the cache; None: none
        (the default). The attention calibrators (compose.Calibrated) set it."""
        return None

    def observe_prefill(self, layer_idx: int, out: torch.Tensor) -> None:
        """Called with each full-attention layer's prefill output (B, L, H, D), after plan() and the
        attention ran (dense layers too). Methods that learn from the outputs override it (SpAtten's
        head importance); the default ignores it."""

    def select_decode(self, layer_idx: int, q: torch.Tensor, layer: "RaggedLayer"):
        """Pages of `layer`'s cache the decode queries q (B, H, Q, D) read: a DecodeSelection, or
        None to read everything the cache holds (the default)."""
        return None

    def supports_static_decode(self) -> bool:
        """Whether this method's per-step decode work can run in a static, graph-captured step
        (static_cache.StaticRaggedLayer: no allocation of cache storage, no host sync, no host
        branch on tensor values). A method that overrides select_decode must say so by
        overriding this too (its selection must then work on the static layer's whole tail ring,
        positions in layer.t_pos); by default it is refused with a clear error, never run wrongly."""
        return type(self).select_decode is Method.select_decode

    def model_crossover_pending(self, device: torch.device) -> bool:
        """Whether this method wants its model-level crossover measured on `device` (the prompt
        length from which its prefill beats plain attention through the whole model; the session
        measures it when enabled, integration/crossover_model.py). Default: no."""
        return False

    def use_model_crossover(self, device: torch.device, tokens: int) -> None:
        """Receive the model-level crossover measured for `device` (see model_crossover_pending)."""

    def check_model(self, model) -> None:
        """Raise if this method cannot run on `model` (e.g. state calibrated on another model)."""

    def report(self) -> dict:
        """Decisions the method took that a user should see (merged into the session's report)."""
        return {}


def model_depth(model) -> int:
    """The number of decoder layers of `model` (its text config's num_hidden_layers)."""
    from ..introspect import text_config

    n = getattr(text_config(model), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{type(model).__name__}: no num_hidden_layers in its config")
    return n


def first_at_depth(start: float, n_layers: int) -> int:
    """The first layer index at relative depth `start` (0: layer 0, 0.5: the second half)."""
    return min(n_layers, int(start * n_layers))


def check_key_block(method: str, value: object, param: str = "block_size") -> None:
    """Raise unless `value` is a key block the block-sparse executor takes: a power of two >= 16."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value & (value - 1):
        raise ValueError(f"{method} needs {param} a power of two >= 16, got {value!r}")


def local_geometry(seq_len: int, block_size: int, window: int) -> tuple[int, int] | None:
    """(n_blocks, local_start) of the global/local split, or None when the prompt stays dense."""
    if seq_len <= window + block_size:
        return None
    n = (seq_len - window) // block_size
    return n, n * block_size


def row_geometry(
    seq_len: int, key_start: torch.Tensor, block_size: int, window: int, dense_below: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (n_blocks, local_start) of a left-padded batch, on key_start's device, no host sync.

    Row r's real prompt is [s_r, L) with s_r = key_start[r] and L_r = L - s_r tokens: its blocks are
    counted from s_r, so they are the blocks it has alone, shifted by its padding. A row that stays
    dense alone (L_r <= window + block_size, or L_r < dense_below) gets n_r = 0 and local start s_r
    (everything local); else n_r = (L_r - window) // block_size and local start s_r + n_r * block_size.
    -> n_rows (B,) int64, local_starts (B,) int64.
    """
    ks = key_start.long()
    real = seq_len - ks
    sparse = real > window + block_size
    if dense_below:
        sparse &= real >= dense_below
    n = torch.where(sparse, torch.div(real - window, block_size, rounding_mode="floor"), torch.zeros_like(real))
    return n, ks + n * block_size


def global_region(seq_len: int, key_start: torch.Tensor, local_starts: torch.Tensor) -> torch.Tensor:
    """(B, seq_len) True on each row's global region [key_start, local_start)."""
    return key_validity(seq_len, key_start) & ~key_validity(seq_len, local_starts)


def key_validity(seq_len: int, key_start: torch.Tensor) -> torch.Tensor:
    """(B, L) True for non-padding keys."""
    return torch.arange(seq_len, device=key_start.device)[None, :] >= key_start[:, None]


def sink_mask(seq_len: int, key_start: torch.Tensor, n_sinks: int) -> torch.Tensor:
    """(B, seq_len) True on the first n_sinks non-padding keys of each row."""
    return key_validity(seq_len, key_start) & ~key_validity(seq_len, key_start + n_sinks)


# -- helpers of the chunk-selecting block-sparse methods (longheads, dhsa) --------------------------
# Elements of a keep mask packed at once (int64 ranks): 512 MiB at most.
_PACK_ELEMENTS = 1 << 26


def row_aligned(x: torch.Tensor, key_start: torch.Tensor, length: int) -> torch.Tensor:
    """x (B, C, L, D) -> (B, C, length, D): row b's positions key_start[b] + t, zeros past L."""
    B, C, L, D = x.shape
    pos = key_start.long()[:, None] + torch.arange(length, device=x.device)  # (B, length)
    idx = pos.clamp(max=L - 1)[:, None, :, None].expand(B, C, length, D)
    return torch.where((pos < L)[:, None, :, None], x.gather(2, idx), x.new_zeros(()))


def real_tokens(seq_len: int, key_start: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) True where row-aligned position t holds a real token (t < L - key_start)."""
    n = seq_len - key_start.long()
    return torch.arange(length, device=key_start.device)[None, :] < n[:, None]


def pack_lists(keep: torch.Tensor, nnz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (B, Hp, NQ, NK) bool -> indptr (B, Hp, NQ + 1) int32, indices (B, Hp, max(nnz, 1)) int32.

    nnz: an upper bound of the longest list (entries past a list's end are unused). The key blocks
    of each query block are listed ascending; packed a few query blocks at a time."""
    B, Hp, NQ, NK = keep.shape
    counts = keep.sum(-1)  # (B, Hp, NQ)
    indptr = torch.nn.functional.pad(counts.cumsum(-1), (1, 0))  # (B, Hp, NQ + 1) int64
    size = max(nnz, 1)
    indices = torch.zeros(B, Hp, size + 1, dtype=torch.int32, device=keep.device)  # slot `size`: a dump
    j = torch.arange(NK, device=keep.device, dtype=torch.int32)
    step = max(1, _PACK_ELEMENTS // max(B * Hp * NK, 1))
    for c0 in range(0, NQ, step):
        kp = keep[:, :, c0 : c0 + step]
        slot = torch.where(kp, indptr[:, :, c0 : c0 + kp.shape[2], None] + kp.cumsum(-1) - 1, size)
        indices.scatter_(2, slot.flatten(2), j.expand(kp.shape).flatten(2))
    return indptr.to(torch.int32), indices[..., :size].contiguous()
