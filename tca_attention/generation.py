"""Run one prompt with a method and measure it: answer, prefill time, decode speed, KV bytes."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .integration import enable
from .methods.base import Method
from .methods.dense import Dense


@dataclass(frozen=True)
class RunResult:
    method: str
    answer: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_tokens_per_s: float | None
    kv_bytes: int
    dense_kv_bytes: int
    kept_fraction: float
    retained_last_query: float | None  # mean over TCA layers/heads of the last query's kept mass
    retained_last_query_min: float | None
    # the quality certificate (engine/certificate.py): the paper's bound on the selection queries'
    # output error, largest and mean over layers and KV heads; per layer in `certificate`
    error_bound: float | None = None
    error_bound_mean: float | None = None
    certificate: tuple[dict[str, Any], ...] = ()

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.dense_kv_bytes if self.dense_kv_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kv_ratio": self.kv_ratio}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_prompt(model, tokenizer, prompt: str, method: Method | None, max_new_tokens: int = 16,
               backend: str = "auto", stop_at_eos: bool = True) -> RunResult:
    """Greedy generation with a manual loop so prefill and decode are timed separately."""
    if not prompt or not prompt.strip():
        raise ValueError("empty prompt")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    method = Dense() if method is None else method
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    eos = tokenizer.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    with enable(model, method, backend=backend) as session:
        cache = session.new_cache()
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **session.cache_kwargs(cache))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        report = session.report()
        tokens = [int(nxt)]
        while len(tokens) < max_new_tokens and not (stop_at_eos and tokens[-1] in eos):
            out = model(input_ids=nxt, use_cache=True, **session.cache_kwargs(cache))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
        _sync(device)
        t2 = time.perf_counter()
        mem = session.cache_report(cache)  # under tensor parallelism: summed over the ranks
    steps = len(tokens) - 1
    return RunResult(
        method=method.name,
        answer=tokenizer.decode(tokens, skip_special_tokens=True),
        prompt_tokens=int(ids.shape[1]),
        new_tokens=len(tokens),
        prefill_s=t1 - t0,
        decode_tokens_per_s=steps / (t2 - t1) if steps else None,
        kv_bytes=mem["kv_bytes"],
        dense_kv_bytes=mem["dense_kv_bytes"],
        kept_fraction=mem["kept_fraction"],
        retained_last_query=report["retained"] if not method.is_dense else 1.0,
        retained_last_query_min=report["retained_min"] if not method.is_dense else 1.0,
        error_bound=report["error_bound"] if not method.is_dense else 0.0,
        error_bound_mean=report["error_bound_mean"] if not method.is_dense else 0.0,
        certificate=tuple(report["layers"]),
    )
