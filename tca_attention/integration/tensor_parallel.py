"""Tensor parallelism: every rank runs the method on the attention heads transformers gave it.

Under transformers' tensor parallelism (adapter.tensor_parallel_layout) the attention function of
rank r sees a contiguous slice of the heads: KV heads [r * KV / world, (r + 1) * KV / world) and
their query heads. Attention, selection and caching are per KV head, so each rank plans, attends
and caches its own heads; transformers' row-parallel output projection sums the ranks' outputs as it
does for plain attention. The only communication on the attention path is in the plans of the
methods that combine the heads of a layer (Method.combines_heads), through the HeadGroup lent here.

This module is the one place that knows about ranks:
  shard_of(model)        which heads this rank holds (HeadShard); a clear error when the heads do
                         not divide by the world size;
  shard_method(m, s)     the method with its per-head state sliced to the rank's heads: every
                         dataclass field declared per_head("kv" | "query") (methods/state.py), at
                         any depth of the method's dataclasses (TCA's budgets, MInference's
                         patterns, the head split's kinds); methods never see a rank;
  heads_of(s)            the HeadGroup lent to a plan that combines the heads of a layer
                         (Method.combines_heads: SpAtten, Token Sparse, DHSA): its sums over heads
                         all-reduced, its rankings of heads over the all-gathered heads;
  merge_layer_rows, merge_method_reports, sum_over_ranks: the session's report and KV bytes
                         over the ranks.
Calibration needs every head: it runs in one process (its state file is then loaded on every rank).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..introspect import text_config
from ..methods.base import ONE_PROCESS, HeadGroup
from ..methods.state import PER_HEAD
from . import adapter


class TensorParallelError(ValueError):
    """A model or a use that tca-attention cannot run under tensor parallelism, with the reason."""


@dataclass(frozen=True)
class HeadShard:
    """The attention heads of one tensor-parallel rank: [start, stop) of the KV and query heads."""

    rank: int
    world: int
    kv: tuple[int, int]
    query: tuple[int, int]
    num_kv_heads: int  # the model's, over all ranks
    num_heads: int
    group: Any = field(default=None, compare=False, repr=False)  # the TP process group

    @property
    def sharded(self) -> bool:
        """Whether this rank holds a part of the heads (else every rank holds all of them)."""
        return self.kv != (0, self.num_kv_heads)

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "kv_heads": list(self.kv), "query_heads": list(self.query)}

    def check_call(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """Raise unless attention got exactly this rank's heads (a cheap check on every call)."""
        h, kv = query.shape[1], key.shape[1]
        if (h, kv) != (self.query[1] - self.query[0], self.kv[1] - self.kv[0]):
            raise adapter.AdapterError(
                f"tensor-parallel rank {self.rank} of {self.world}: layer {layer_idx}'s attention got {h} query and "
                f"{kv} KV heads; from the model's tp_plan this rank holds query heads {list(self.query)} and KV heads "
                f"{list(self.kv)} of {self.num_heads} / {self.num_kv_heads}")


def shard_of(model: torch.nn.Module) -> HeadShard | None:
    """This process's heads of a tensor-parallel model; None for a model loaded without it."""
    layout = adapter.tensor_parallel_layout(model)
    if layout is None:
        return None
    cfg = text_config(model)
    H, KV, w, r = cfg.num_attention_heads, cfg.num_key_value_heads, layout.world, layout.rank
    if not layout.heads_sharded:
        return HeadShard(r, w, (0, KV), (0, H), KV, H, layout.group)
    if KV % w or H % w:
        raise TensorParallelError(
            f"tensor parallelism over {w} ranks splits the attention heads evenly, but this model has "
            f"{KV} KV heads and {H} query heads: use a world size that divides {KV} "
            f"(transformers would shard its k_proj ({layout.style!r}) unevenly and fail inside the attention layer)")
    kv, q = KV // w, H // w
    return HeadShard(r, w, (r * kv, (r + 1) * kv), (r * q, (r + 1) * q), KV, H, layout.group)


# -- the heads of a layer, over the ranks ---------------------------------------------------------
@dataclass(frozen=True)
class RankHeads(HeadGroup):
    """A HeadGroup over the TP group: this rank holds the rank-th of world equal slices of the heads.
    Every rank calls sum / gather in the same order (the plans' collectives depend on shapes and
    key_start only, which every rank shares)."""

    group: Any = field(default=None, compare=False, repr=False)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.contiguous().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim)


def heads_of(shard: HeadShard | None) -> HeadGroup:
    """What a plan combining the heads of a layer runs its sums and rankings over: the TP group
    when this rank holds a slice of the heads, else this process (it holds every head)."""
    if shard is None or not shard.sharded:
        return ONE_PROCESS
    return RankHeads(shard.rank, shard.world, shard.group)


# -- per-head state ------------------------------------------------------------------------------
def shard_method(method: Any, shard: HeadShard) -> Any:
    """`method` with every per-head table sliced to the shard's heads (itself when whole)."""
    return method if not shard.sharded else _slice(method, shard)


def _slice(obj: Any, shard: HeadShard) -> Any:
    """A dataclass instance with its per_head fields (at any depth) sliced; other values as they are.

    Fields given to the constructor are replaced through dataclasses.replace (which rebuilds
    what is derived from them and starts fresh caches); derived per-head fields (init=False) are
    sliced after that, from the whole object's table."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    given, derived = {}, {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        axis = f.metadata.get(PER_HEAD)
        new = _slice_table(value, axis, shard, f"{type(obj).__name__}.{f.name}") if axis else _slice(value, shard)
        if new is not value:
            (given if f.init else derived)[f.name] = new
    if not given and not derived:
        return obj
    out = dataclasses.replace(obj, **given)
    for name, value in derived.items():
        object.__setattr__(out, name, value)  # frozen dataclass: set once, as __post_init__ would
    return out


def _slice_table(table: Any, axis: str, shard: HeadShard, what: str) -> Any:
    """A tuple over layers of None or one entry per head -> the same with the shard's heads."""
    (start, stop), total = (shard.kv, shard.num_kv_heads) if axis == "kv" else (shard.query, shard.num_heads)
    if table is None:
        return None
    rows = []
    for i, row in enumerate(table):
        if row is not None and len(row) != total:
            raise TensorParallelError(f"{what}[{i}] has {len(row)} entries; the model has {total} "
                                      f"{'KV' if axis == 'kv' else 'query'} heads")
        rows.append(None if row is None else row[start:stop])
    return tuple(rows)


# -- over the ranks ------------------------------------------------------------------------------
def _device(shard: HeadShard) -> torch.device:
    """Where the TP group's collectives take tensors (NCCL: the rank's GPU; gloo: the CPU)."""
    if dist.get_backend(shard.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: list[int], shard: HeadShard) -> list[int]:
    """Integers summed over the TP group (every rank must call this)."""
    t = torch.tensor(values, dtype=torch.int64, device=_device(shard))
    dist.all_reduce(t, group=shard.group)
    return [int(x) for x in t.tolist()]


def gather(obj: Any, shard: HeadShard) -> list[Any]:
    """Every rank's `obj`, in rank order (every rank must call this)."""
    out: list[Any] = [None] * shard.world
    dist.all_gather_object(out, obj, group=shard.group)
    return out


def merge_layer_rows(rows: dict[int, tuple[float, dict[str, float] | None]],
                     shard: HeadShard) -> dict[int, tuple[float, dict[str, float] | None]]:
    """Per layer (kept fraction, certificate) over every rank's heads, from each rank's own (every
    rank must call this). The certificate's means (retained_mean, bound_mean) are means over the
    ranks (every rank holds as many heads as any other: the mean over all heads), its _min / _max
    the smallest / largest. A layer whose plan did not score on some rank (certificate None; that
    rank's heads are not all dense) does not score as a whole, as in one process."""
    ranks = gather(rows, shard)
    out = {}
    for i in rows:
        kept, certs = zip(*(r[i] for r in ranks))
        cert = None
        if None not in certs:
            cert = {key: (min if key.endswith("_min") else max if key.endswith("_max") else _mean)(
                [c[key] for c in certs]) for key in certs[0]}
        out[i] = (_mean(kept), cert)
    return out


def _mean(values) -> float:
    return sum(values) / len(values)


def merge_method_reports(report: dict[str, Any], method: Any, shard: HeadShard) -> dict[str, Any]:
    """One method report from every rank's own (every rank must call this). Keys the method lists in
    report_sums count heads: summed over the ranks (dicts key by key). Any other key: its value when
    every rank has the same, else the list of the ranks' values."""
    ranks = gather(report, shard)
    sums = set(getattr(method, "report_sums", ()))
    out: dict[str, Any] = {}
    for key in report:
        vals = [r.get(key) for r in ranks]
        out[key] = _sum(vals) if key in sums else vals[0] if all(v == vals[0] for v in vals) else vals
    return out


def _sum(vals: list[Any]) -> Any:
    if all(isinstance(v, dict) for v in vals):
        return {k: _sum([v.get(k, 0) for v in vals]) for k in vals[0]}
    return sum(vals)
