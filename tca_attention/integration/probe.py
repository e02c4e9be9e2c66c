"""Lend a model to a method's calibration (methods/base.Probe), and the calibrate entry points.

Methods never import the integration: a calibration receives a ModelProbe, which runs one dense
forward through an observing session, or evaluates the next-token loss under a method (searching
calibrations). `calibrate` and `load_or_calibrate` take a model, as users do.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import nn

from ..methods.base import GradientObserver, Method, Observer, Override
from ..methods.tca import budget_cache
from ..methods.tca import calibration as tca_calibration
from ..methods.tca.budgets import Budgets
from ..methods.tca.config import TCAConfig
from .architectures import check_supported
from .hf import Session


class ModelProbe:
    """A supported model, observed through a dense forward (no cache, last logits only)."""

    def __init__(self, model: nn.Module) -> None:
        check_supported(model)
        self.model = model

    @torch.no_grad()
    def observe(self, input_ids: torch.Tensor, observer: Observer) -> None:
        with Session(self.model, None, observer=observer):
            self.model(input_ids, use_cache=False, logits_to_keep=1)

    def observe_gradients(self, input_ids: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor],
                          observer: GradientObserver) -> None:
        """One dense forward of input_ids (1, L) and the gradient of loss(logits (1, L, V)) with
        respect to every full-attention layer's output, without parameter gradients (the input
        embeddings are the only leaf). observer(layer, q, k, v, scaling, d_out) per full layer,
        after the backward: q/k/v detached, d_out (B, L, H, D) = dloss / d(attention output)."""
        seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}
        outs: dict[int, torch.Tensor] = {}

        def keep(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> None:
            seen[idx] = (q.detach(), k.detach(), v.detach(), scaling)

        with torch.enable_grad(), Session(self.model, None, observer=keep,
                                          output_observer=lambda idx, out: outs.__setitem__(idx, out)):
            emb = self.model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            logits = self.model(inputs_embeds=emb, use_cache=False).logits
            layers = sorted(outs)
            grads = torch.autograd.grad(loss(logits), [outs[i] for i in layers], allow_unused=True)
        del logits, outs
        for idx, g in zip(layers, grads):
            q, k, v, scaling = seen[idx]
            observer(idx, q, k, v, scaling, torch.zeros_like(q.transpose(1, 2)) if g is None else g.detach())

    def hidden_states(self, input_ids: torch.Tensor, override: Override | None = None) -> torch.Tensor:
        with Session(self.model, None, override=override):
            out = self.model(input_ids, use_cache=False, logits_to_keep=1, output_hidden_states=True)
        return out.hidden_states[-1]

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor, method: Method) -> dict[str, float]:
        """Mean next-token NLL and entropy of input_ids (1, L) under `method` (no cache)."""
        with Session(self.model, method):
            logits = self.model(input_ids, use_cache=False).logits[0, :-1].float()  # (L - 1, V)
        logp = logits.log_softmax(-1)
        nll = -logp.gather(-1, input_ids[0, 1:, None].to(logp.device)).mean()
        entropy = -(logp.exp() * logp).sum(-1).mean()
        return {"nll": float(nll), "entropy": float(entropy)}

    @torch.no_grad()
    def answer_logits(self, input_ids: torch.Tensor, answer_start: int, method: Method | None) -> torch.Tensor:
        """input_ids (1, L): the prompt ids[:answer_start] prefilled under `method` (None: dense) into
        its cache, then the answer teacher-forced one token at a time -> (L - answer_start, V)."""
        n = input_ids.shape[1]
        if input_ids.shape[0] != 1 or not 0 < answer_start < n:
            raise ValueError(f"answer_logits needs ids (1, L) and 0 < answer_start < L, got {tuple(input_ids.shape)} "
                             f"and {answer_start}")
        with Session(self.model, method) as session:
            cache = session.new_cache()
            out = self.model(input_ids[:, :answer_start], use_cache=True, logits_to_keep=1, **session.cache_kwargs(cache))
            rows = [out.logits[0, -1]]
            for t in range(answer_start, n - 1):
                out = self.model(input_ids[:, t:t + 1], use_cache=True, **session.cache_kwargs(cache))
                rows.append(out.logits[0, -1])
        return torch.stack(rows)


def calibrate(model: nn.Module, tokenizer, config: TCAConfig = TCAConfig(), text: str | Sequence[str] | None = None,
              length: int | None = None, progress: bool = True,
              plan: tca_calibration.CalibrationSet = tca_calibration.CalibrationSet()) -> Budgets:
    """TCA's calibration of `model` on real text (once; see methods/tca/calibration.py) -> Budgets.
    plan: several samples and lengths, their retained scores combined (CalibrationSet)."""
    return tca_calibration.calibrate(ModelProbe(model), tokenizer, config, text=text, length=length, progress=progress,
                                     plan=plan)


def load_or_calibrate(model: nn.Module, tokenizer, model_key: str, config: TCAConfig, budgets: str | None = None,
                      length: int | None = None, announce: bool = True,
                      plan: tca_calibration.CalibrationSet | None = None) -> Budgets:
    """TCA budgets from a file or the per-model cache, calibrating once if needed (budget_cache.py)."""
    return budget_cache.load_or_calibrate(ModelProbe(model), tokenizer, model_key, config, budgets=budgets,
                                          length=length, announce=announce, plan=plan)
