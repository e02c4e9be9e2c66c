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
    def answer_logits(self, prompts: Sequence[Sequence[int]], answer_starts: Sequence[int],
                      method: Method | None) -> list[torch.Tensor]:
        """Each prompt's ids[:start] prefilled under `method` (None: dense) into its cache, then its
        answer ids[start:] teacher-forced one token at a time -> per prompt (len - start, V) logits
        predicting each answer token. One left-padded batch: the prompts are aligned on their answer
        start (position ids from the mask, as generate() does); a row whose answer is shorter than
        the longest is fed a filler token afterwards, whose logits are dropped."""
        if len(prompts) != len(answer_starts) or not prompts:
            raise ValueError(f"answer_logits needs as many answer starts as prompts (>= 1), got "
                             f"{len(prompts)} and {len(answer_starts)}")
        for ids, start in zip(prompts, answer_starts):
            if not 0 < start < len(ids):
                raise ValueError(f"answer_logits needs 0 < answer_start < len(ids), got {start} for {len(ids)} tokens")
        device = next(self.model.parameters()).device
        B, P = len(prompts), max(answer_starts)
        n_answer = [len(ids) - s for ids, s in zip(prompts, answer_starts)]
        A = max(n_answer)
        ids = torch.zeros(B, P + A - 1, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.long)
        for r, (row, s) in enumerate(zip(prompts, answer_starts)):
            ids[r, P - s:P] = torch.as_tensor(row[:s])
            mask[r, P - s:] = 1
            answer = torch.as_tensor(row[s:-1])  # the tokens fed back (the last one predicts nothing)
            ids[r, P:P + len(answer)] = answer
            ids[r, P + len(answer):] = row[-1]  # filler
        ids, mask = ids.to(device), mask.to(device)
        with Session(self.model, method) as session:
            cache = session.new_cache()
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            out = self.model(input_ids=ids[:, :P], attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **session.cache_kwargs(cache))
            steps = [out.logits[:, -1]]
            for t in range(P, P + A - 1):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                out = self.model(input_ids=ids[:, t:t + 1], attention_mask=mask, position_ids=pos, use_cache=True,
                                 **session.cache_kwargs(cache))
                steps.append(out.logits[:, -1])
        logits = torch.stack(steps, 1)  # (B, A, V)
        return [logits[r, :n] for r, n in enumerate(n_answer)]


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
