"""Which layers TCA should leave dense: a per-layer probe of the model's own answers (issue 13).

Attention-side signals (retained mass, the paper's error bound) do not say which model tolerates
which tau (docs/results/probe_tau_cpu). This probe asks the outputs: TCA at the budgets' tau runs
in ONE layer at a time, every other TCA layer dense, on needle prompts (real essays, a sentence
with three secret words and a number, the question; data/needle.py). The answer is teacher-forced
through the method's cache and each answer position's prediction is compared with dense
attention's (argmax agreement, KL(dense || TCA) per token). Layers whose agreement alone falls
below a floor, or whose KL alone exceeds a ceiling, keep their whole KV (TCA's `dense_at`;
`dense_at=auto` in a spec).

Measured at the suite's lengths and budgets (CPU): SmolLM2-135M's multi-item retrieval is lost in
two of its 30 layers; Gemma3-270M's three global layers each keep agreement >= 0.96 at 16K.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..base import Probe
from ..state import ModelIdentity, StateError, announce, check_header, json_type, save_json
from .budgets import Budgets

FORMAT = "tca-attention/layer-probe"
VERSION = 1
DEFAULT_MIN_AGREEMENT = 0.9  # between SmolLM2's two culprits (0.73, 0.86 at 4K) and every other layer seen (>= 0.96)
# KL(dense || TCA) per answer token: the culprits the suite confirmed are >= 0.099 (SmolLM2 at
# 8K, 4 prompts: layer 18 0.22 at tau 0.8 with agreement 0.92, which the floor alone let through
# and the suite scored 8.1 of 24.9; layer 7 0.10-0.12 at tau 0.7-0.75), every other layer seen <= 0.046
# (SmolLM2 <= 0.026, Gemma3 <= 0.046, Qwen <= 0.001; docs/results/leaderboard_smollm2/calibration/layer_probes)
DEFAULT_MAX_KL = 0.05


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe runs: needle prompts of `length` tokens (None: the budgets' calibration
    length) at `prompts` evenly spread depths, drawn with `seed`."""

    length: int | None = None
    prompts: int = 4
    seed: int = 7

    def __post_init__(self) -> None:
        if self.length is not None and (isinstance(self.length, bool) or not isinstance(self.length, int)
                                        or self.length < 256):
            raise ValueError(f"probe length must be an int >= 256 tokens, got {self.length!r}")
        if isinstance(self.prompts, bool) or not isinstance(self.prompts, int) or self.prompts < 1:
            raise ValueError(f"probe prompts must be an int >= 1, got {self.prompts!r}")

    def resolved_length(self, budgets: Budgets) -> int:
        if self.length is not None:
            return self.length
        tokens = budgets.calibration.get("tokens")
        if not isinstance(tokens, int) or tokens < 256:
            raise ValueError("these budgets do not record their calibration length: give the probe a length")
        return tokens


@dataclass(frozen=True)
class LayerProbe:
    """Per layer (None: a layer TCA leaves alone), with TCA in that layer only: the agreement of
    its answer predictions with dense attention's, KL(dense || TCA) per answer token, and the
    budgets' expected kept fraction of the layer's global region."""

    model: ModelIdentity
    agreement: tuple[float | None, ...]
    kl: tuple[float | None, ...]
    kept: tuple[float | None, ...]
    settings: dict[str, Any] = field(default_factory=dict)  # tau, options, length, prompts, seed, dense accuracy

    def dense_layers(self, min_agreement: float = DEFAULT_MIN_AGREEMENT,
                     max_kl: float = DEFAULT_MAX_KL) -> tuple[int, ...]:
        """The layers whose agreement alone is below min_agreement or whose KL per answer token
        alone exceeds max_kl (math.inf: agreement only), in order."""
        if not 0.0 <= min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement!r}")
        if not max_kl >= 0.0:
            raise ValueError(f"max_kl must be >= 0 (inf: agreement only), got {max_kl!r}")
        return tuple(i for i, (a, k) in enumerate(zip(self.agreement, self.kl))
                     if a is not None and (a < min_agreement or k > max_kl))

    def check_model(self, model) -> None:
        why = self.model.mismatch(ModelIdentity.of(model))
        if why:
            raise StateError(f"layer probe of {self.model.name or self.model.model_type} does not fit this model: {why}")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": asdict(self.model), "settings": self.settings,
                "agreement": list(self.agreement), "kl": list(self.kl), "kept": list(self.kept)}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_json(), path)

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> "LayerProbe":
        where = f" {source}" if source else ""

        def bad(why: str) -> StateError:
            return StateError(f"corrupt layer-probe file{where}: {why}")

        check_header(data, FORMAT, VERSION, "layer-probe file", source)
        model = ModelIdentity.from_json(data.get("model"), bad)
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise bad(f"settings must be an object, got {json_type(settings)}")
        rows = {}
        for key, lo, hi in (("agreement", 0.0, 1.0), ("kl", 0.0, math.inf), ("kept", 0.0, 1.0)):
            v = data.get(key)
            if not isinstance(v, list) or len(v) != model.num_layers:
                raise bad(f"{key} must be a list of {model.num_layers} entries (one per layer)")
            for i, x in enumerate(v):
                if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))
                                      or not lo <= x <= hi):
                    raise bad(f"{key}[{i}] must be null or a number in [{lo}, {hi}], got {x!r}")
            rows[key] = tuple(None if x is None else float(x) for x in v)
        if [a is None for a in rows["agreement"]] != [k is None for k in rows["kl"]]:
            raise bad("agreement and kl must name the same layers")
        return cls(model, rows["agreement"], rows["kl"], rows["kept"], settings)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "LayerProbe":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read layer-probe file {path}: {e}") from e
        probe = cls.from_json(data, source=str(path))
        if model is not None:
            probe.check_model(model)
        return probe


def needle_prompts(tokenizer, settings: ProbeSettings, length: int):
    """The probe's prompts: real essays with a needle at evenly spread depths (data/needle.py)."""
    from ...data.corpus import essay_text
    from ...data.needle import _ids, needle_prompt

    rng = random.Random(settings.seed)
    hay = _ids(tokenizer, essay_text())
    return [needle_prompt(tokenizer, hay, length, (i + 0.5) / settings.prompts, rng) for i in range(settings.prompts)]


def probe_layers(probe: Probe, tokenizer, budgets: Budgets, options: Mapping[str, Any] | None = None,
                 settings: ProbeSettings = ProbeSettings(), progress: bool = True) -> LayerProbe:
    """Run the probe: dense once, then TCA (budgets at their tau, `options` = TCA's runtime options
    such as last_q, span) in each TCA layer alone. Costs (1 + TCA layers) x prompts prefills."""
    from .method import TCA

    options = dict(options or {})
    if bad := sorted(set(options) & {"dense_at", "dense_layers", "dense_below"}):
        raise ValueError(f"the layer probe sets {', '.join(bad)} itself")
    model = probe.model
    length = settings.resolved_length(budgets)
    prompts = needle_prompts(tokenizer, settings, length)
    tca_layers = [i for i, heads in enumerate(budgets.layers) if heads is not None]

    def logits_under(method) -> list[torch.Tensor]:  # the prompts as one batch
        out = probe.answer_logits([p.ids for p in prompts], [p.answer[0] for p in prompts], method)
        return [x.float().cpu() for x in out]

    runs: list[tuple[int | None, Any]] = [(None, None)] + [
        (i, TCA(budgets, dense_below=0, dense_at=tuple(j for j in tca_layers if j != i), **options))
        for i in tca_layers]
    bar = _progress(len(runs), progress, f"layer probe ({len(prompts)} x {length} tokens)")
    dense: list[torch.Tensor] = []
    agreement: list[float | None] = [None] * len(budgets.layers)
    kl: list[float | None] = [None] * len(budgets.layers)
    for layer, method in runs:
        out = logits_under(method)
        if layer is None:
            dense = out
        else:
            n = sum(len(d) for d in dense)
            agreement[layer] = sum(int((d.argmax(-1) == s.argmax(-1)).sum()) for d, s in zip(dense, out)) / n
            kl[layer] = max(0.0, sum(float(torch.nn.functional.kl_div(
                s.log_softmax(-1), d.log_softmax(-1), log_target=True, reduction="sum")) for d, s in zip(dense, out)) / n)
        bar(layer)
    truth = [torch.tensor(p.ids[p.answer[0]:p.answer[1]]) for p in prompts]
    dense_acc = sum(int((d.argmax(-1) == t).sum()) for d, t in zip(dense, truth)) / sum(len(t) for t in truth)
    fractions = budgets.head_fractions()
    kept = tuple(None if f is None else sum(f) / len(f) for f in fractions)
    recorded = {"tau": budgets.config.tau, "options": dict(sorted(options.items())), "length": length,
                "prompts": settings.prompts, "seed": settings.seed, "dense_answer_accuracy": dense_acc,
                "answer_tokens": sum(len(t) for t in truth)}
    return LayerProbe(ModelIdentity.of(model), tuple(agreement), tuple(kl), kept, recorded)


def _progress(total: int, show: bool, what: str) -> Callable[[int | None], None]:
    if not show:
        return lambda layer: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=what, unit="pass")

    def step(layer: int | None) -> None:
        bar.set_postfix_str("dense" if layer is None else f"layer {layer}")
        bar.update(1)
        if bar.n >= total:
            bar.close()
    return step


def probe_path_for(model, model_key: str, budgets: Budgets, options: Mapping[str, Any], settings: ProbeSettings) -> Path:
    """Where a probe of these budgets (at their tau), options and settings is cached."""
    from ...paths import cache_root

    ident = {k: v for k, v in asdict(ModelIdentity.of(model)).items() if k != "name"}
    key = [model_key, ident, budgets.to_json(), dict(sorted(options.items())), asdict(settings), VERSION]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key).name) or "model"
    return cache_root() / "layer_probes" / f"{safe}-{digest}.json"


def load_or_probe(probe: Probe, tokenizer, model_key: str, budgets: Budgets, options: Mapping[str, Any] | None = None,
                  settings: ProbeSettings = ProbeSettings(), show: bool = True) -> LayerProbe:
    """The probe of these budgets from the per-model cache, running it once (announced on stderr)."""
    options = dict(options or {})
    path = probe_path_for(probe.model, model_key, budgets, options, settings)
    if path.exists():
        announce(show, f"Using cached layer probe {path} (delete the file to probe again).", once=path)
        return LayerProbe.load(path, model=probe.model)
    n = sum(h is not None for h in budgets.layers)
    announce(show, f"Probing TCA layer by layer ONCE for this model and tau {budgets.config.tau}: "
                   f"{(1 + n) * settings.prompts} prefills of {settings.resolved_length(budgets)} tokens; "
                   f"the result will be cached in {path}.")
    result = probe_layers(probe, tokenizer, budgets, options, settings, progress=show)
    result.save(path)
    announce(show, f"Layer probe saved to {path}.")
    return result
