"""DuoAttention (Xiao et al., ICLR 2025): per-head gates optimised on synthetic passkey data.

Every KV head of every full-attention layer gets a gate alpha in [0, 1]. During the optimisation each
head's attention output is alpha * full attention + (1 - alpha) * streaming attention (the first
`sinks` keys plus the `recent` most recent ones, causal), the model's weights stay frozen, and only
the gates move: the loss is the mean squared distance between the last hidden states of this mixed
model and of the full model on the passkey answer span, plus reg x the mean of the gates (L1: gates
in [0, 1] are their own absolute value). Gates start at 1 and are clamped to [0, 1] before each step.

Deployment is head-split's execution with the gates as the head scores (head_kinds.py: the
`retrieval_fraction` of KV heads with the highest gates keep full attention and the whole cache,
the others keep sinks + the recent window, in prefill and decode; tested equal to HeadSplit on them). The gates are
plain versioned JSON tied to the model's identity, optimised once per model and cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from ..data.corpus import essay_text
from ..data.needle import NeedlePrompt, _ids, needle_prompt
from ..introspect import layer_kinds, text_config
from .base import Probe
from .head_kinds import RetrievalSplit, top_heads
from .head_kinds import retrieval_fraction_for as _solve
from .state import announce as say
from .state import ModelIdentity, StateError, check_header, layer_rows, save_json, unit_scores

log = logging.getLogger(__name__)

FORMAT = "tca-attention/duo-gates"
FORMAT_VERSION = 1


# -- the gated attention of the optimisation ------------------------------------------------------
def streaming_mask(L: int, sinks: int, recent: int, device=None) -> torch.Tensor:
    """(L, L) bool: query j sees key s iff s <= j and (s < sinks or s > j - recent)."""
    j = torch.arange(L, device=device)[:, None]
    s = torch.arange(L, device=device)[None, :]
    return (s <= j) & ((s < sinks) | (s > j - recent))


def gated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, gate: torch.Tensor,
                    sinks: int, recent: int) -> torch.Tensor:
    """alpha * full + (1 - alpha) * streaming attention, alpha = gate[kv head of each query head].

    q (B, H, L, D), k/v (B, KV, L, D), gate (KV,) -> (B, L, H, D) in q's dtype (fp32 inside)."""
    B, H, L, D = q.shape
    g = H // k.shape[1]
    qf, kk, vv = q.float(), k.float().repeat_interleave(g, dim=1), v.float().repeat_interleave(g, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    full = sdpa(qf, kk, vv, is_causal=True, scale=scaling)  # (B, H, L, D)
    stream = sdpa(qf, kk, vv, attn_mask=streaming_mask(L, sinks, recent, q.device), scale=scaling)
    a = gate.float().repeat_interleave(g)[None, :, None, None]  # (1, H, 1, 1)
    return (a * full + (1 - a) * stream).transpose(1, 2).to(q.dtype)


# -- the state ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DuoGates:
    """The optimised gate of every KV head: layers[i] is None for layers left alone (sliding-window
    layers), else one gate in [0, 1] per KV head."""

    model: ModelIdentity
    layers: tuple[tuple[float, ...] | None, ...]
    calibration: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def retrieval_heads(self, fraction: float) -> tuple[tuple[bool, ...] | None, ...]:
        """Per layer, which KV heads are retrieval heads: the round(fraction * N) highest gates."""
        return top_heads(self.layers, fraction)

    def check_model(self, model) -> None:
        why = self.model.mismatch(ModelIdentity.of(model))
        if why:
            raise StateError(f"duo gates for {self.model.name or self.model.model_type} do not fit this model: {why}")

    def summary(self, thresholds: tuple[float, ...] = (0.1, 0.5, 0.9)) -> dict[str, Any]:
        """A few numbers about the gates (for reports; no weights)."""
        flat = [x for row in self.layers if row is not None for x in row]
        t = torch.tensor(flat, dtype=torch.float64)
        return {"kv_heads": len(flat), "mean": round(float(t.mean()), 4), "min": round(float(t.min()), 4),
                "max": round(float(t.max()), 4),
                "above": {str(x): int((t > x).sum()) for x in thresholds},
                "per_layer_mean": [None if r is None else round(sum(r) / len(r), 4) for r in self.layers]}

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "model": asdict(self.model),
                "calibration": self.calibration,
                "layers": [None if r is None else list(r) for r in self.layers]}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_json(), path)

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> "DuoGates":
        where = f" {source}" if source else ""

        def bad(why: str) -> StateError:
            return StateError(f"corrupt duo gate file{where}: {why}")

        check_header(data, FORMAT, FORMAT_VERSION, "duo gate file", source)
        model = ModelIdentity.from_json(data.get("model"), bad)
        calib, layers = data.get("calibration", {}), data.get("layers")
        if not isinstance(calib, dict):
            raise bad("calibration must be an object")
        layer_rows(layers, "layers", model.num_layers, model.num_kv_heads, unit_scores, "gates in [0, 1]", bad)
        if all(r is None for r in layers):
            raise bad("no layer has gates")
        return cls(model, tuple(None if r is None else tuple(float(x) for x in r) for r in layers), calib)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "DuoGates":
        """Load a gate file; with `model`, refuse gates optimised on another model."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
            raise StateError(f"corrupt duo gate file {path}: {e}") from e
        gates = cls.from_json(data, source=str(path))
        if model is not None:
            gates.check_model(model)
        return gates


# -- the optimisation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Optimisation:
    """What the gate optimisation runs. The paper: 2000 steps of one passkey sample of 1K-32K tokens
    (8 GPUs), lr 0.02, reg 0.05, sinks 128 + recent 256 while training; see docs/methods.md for
    what we run on a CPU."""

    steps: int = 100
    length: int = 1024  # tokens per sample (the paper draws 1K to 32K)
    lr: float = 0.02
    reg: float = 0.05
    sinks: int = 128
    recent: int = 256
    init: float = 1.0
    depths: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)  # needle depths, cycled over the steps
    seed: int = 0


def _lr_at(step: int, steps: int) -> float:
    """The paper's schedule shape: linear warm-up over the first fifth, linear decay over the last
    fifth, never below 0.1 of the peak (a factor of the peak lr)."""
    fifth = max(steps // 5, 1)
    return min(1.0, max((step + 1) / fifth, 0.1), max((steps - step) / fifth, 0.1))


def optimise_gates(probe: Probe, prompts: list[NeedlePrompt], opt: Optimisation = Optimisation(),
                   progress: bool = True) -> DuoGates:
    """DuoAttention's gate optimisation of the probe's model on `prompts` (cycled), weights frozen."""
    model = probe.model
    kinds = layer_kinds(model)
    n_kv = text_config(model).num_key_value_heads
    device = next(model.parameters()).device
    full_layers = [i for i, k in enumerate(kinds) if k == "full"]
    gates = torch.full((len(kinds), n_kv), float(opt.init), device=device, requires_grad=True)
    optim = torch.optim.AdamW([gates], lr=opt.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr_at(s, opt.steps))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def mixed(idx: int, q, k, v, scaling):
        return gated_attention(q, k, v, scaling, gates[idx], opt.sinks, opt.recent)

    t0 = time.perf_counter()
    last, targets = {}, []
    try:
        bar = tqdm(range(opt.steps), desc="duo gate optimisation", disable=not progress)
        for step in bar:
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            p = prompts[step % len(prompts)]
            ids = torch.tensor([p.ids], device=device)
            a0, a1 = p.answer
            if step < len(prompts):  # the full model's answer-span states, once per prompt
                with torch.no_grad():
                    targets.append(probe.hidden_states(ids)[0, a0:a1].float())  # (A, hidden)
            target = targets[step % len(prompts)]
            got = probe.hidden_states(ids, mixed)[0, a0:a1].float()
            distill = (got - target).pow(2).mean(-1).mean()
            reg = gates[full_layers].abs().mean()
            loss = distill + opt.reg * reg
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            last = {"distill": distill.item(), "reg": reg.item()}
            bar.set_postfix(distill=f"{last['distill']:.4f}", reg=f"{last['reg']:.3f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    final = gates.detach().clamp(0.0, 1.0).cpu()
    layers = tuple(tuple(round(float(x), 6) for x in final[i]) if kinds[i] == "full" else None
                   for i in range(len(kinds)))
    return DuoGates(ModelIdentity.of(model), layers, {
        **asdict(opt), "prompts": len(prompts), "final_loss": {k: round(v, 6) for k, v in last.items()},
        "seconds": round(time.perf_counter() - t0, 2)})


def passkey_prompts(tokenizer, opt: Optimisation, text: str | None = None) -> list[NeedlePrompt]:
    """One synthetic passkey prompt per depth (head-split's needle prompts: real text, a random
    needle of secret words and a number, the question, and the needle again as the answer)."""
    hay = _ids(tokenizer, essay_text() if text is None else text)
    rng = random.Random(opt.seed)
    return [needle_prompt(tokenizer, hay, opt.length, d, rng) for d in opt.depths]


def gates_path_for(model, model_key: str, opt: Optimisation) -> Path:
    """Where the gates of this model and optimisation are cached (under paths.cache_root())."""
    from ..paths import cache_root

    ident = {k: v for k, v in asdict(ModelIdentity.of(model)).items() if k != "name"}
    digest = hashlib.sha256(json.dumps([model_key, ident, asdict(opt), FORMAT_VERSION], sort_keys=True)
                            .encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key).name) or "model"
    return cache_root() / "duo_gates" / f"{safe}-{digest}.json"


def load_or_optimise(probe: Probe, tokenizer, model_key: str, opt: Optimisation = Optimisation(),
                     announce: bool = True) -> DuoGates:
    """Gates from the per-model cache, optimising once if needed (announced on stderr)."""
    model = probe.model
    path = gates_path_for(model, model_key, opt)
    if path.exists():
        say(announce, f"Using cached duo gates {path} (delete the file to optimise again).", once=path)
        return DuoGates.load(path, model=model)
    say(announce, f"Optimising DuoAttention's gates ONCE for this model: {opt.steps} steps on "
                      f"{opt.length}-token passkey prompts; the gates will be cached in {path}.")
    gates = optimise_gates(probe, passkey_prompts(tokenizer, opt), opt, progress=announce)
    gates.save(path)
    say(announce, f"Duo gates saved to {path}.")
    return gates


# -- the method -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Duo(RetrievalSplit):
    """Retrieval heads (the retrieval_fraction of KV heads with the highest gates) full; the others
    sinks + recent window (head_kinds.RetrievalSplit, as head-split)."""

    gates: DuoGates
    name: str = "duo"

    def ranking(self) -> DuoGates:
        return self.gates


def retrieval_fraction_for(kept_fraction: float, seq_len: int, params: Mapping[str, Any]) -> float:
    """The density knob: the retrieval fraction keeping about kept_fraction of a seq_len prompt
    (streaming heads hold sinks + the local region; head_kinds.retrieval_fraction_for)."""
    defaults = {f.name: f.default for f in fields(Duo) if f.name in ("sinks", "window", "block_size")}
    p = {**defaults, **params}
    return _solve(kept_fraction, seq_len, p["sinks"], p["window"], p["block_size"])
