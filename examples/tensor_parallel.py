"""A passkey prompt through TCA (or any method) under transformers' tensor parallelism.

    torchrun --nproc_per_node 3 examples/tensor_parallel.py smollm2 --budgets budgets.json

MODEL: a HF folder or a packaged model key (a packaged model is converted once on first use: run
e.g. `tca calibrate --model smollm2 --out budgets.json` in one process first, which also makes
the budgets; the ranks then only read). The KV heads must divide by the number of processes
(SmolLM2: 3, Qwen2.5-Coder-0.5B: 2, Llama-3.1-8B: 2, 4 or 8). GPUs: NCCL, one per rank; no GPU:
gloo on the CPU. --nproc_per_node 1 runs the same script in one process (the reference).
See docs/tensor_parallel.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig

import tca_attention as tca
from tca_attention.data.passkey import passkey_prompt
from tca_attention.integration.adapter import LOAD_KWARGS
from tca_attention.models import resolve_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--method", default="tca", help="a registry spec (tca needs --budgets)")
    ap.add_argument("--budgets", help="TCA budget file, calibrated in one process")
    ap.add_argument("--passkey", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--json", action="store_true", help="print one JSON line (rank 0)")
    args = ap.parse_args()

    path = Path(args.model) if Path(args.model).is_dir() else resolve_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                 dtype=torch.float32, **LOAD_KWARGS).eval()
    tok = AutoTokenizer.from_pretrained(path)
    extra = {"budgets": tca.Budgets.load(args.budgets, model=model)} if args.budgets else {}
    method = tca.create(args.method, **extra)
    prompt = passkey_prompt(tok, args.passkey)
    inputs = tok(prompt.text, return_tensors="pt").to(model.device)
    with torch.no_grad(), tca.enable(model, method) as session:
        out = session.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
        report, memory = session.prefill_report(), session.cache_report()  # over every rank's heads
        mine = session.cache.kv_bytes() if hasattr(session.cache, "kv_bytes") else None
        shard = session.shard.describe() if session.shard is not None else None
    rank = dist.get_rank() if dist.is_initialized() else 0
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"[rank {rank}] heads {shard}: this rank holds {mine} bytes of KV", flush=True)
    if rank == 0:
        row = {"world": dist.get_world_size() if dist.is_initialized() else 1, "method": args.method,
               "answer": answer, "expected": prompt.answer, "found": prompt.answer in answer,
               "tokens": out[0, inputs["input_ids"].shape[1]:].tolist(), **memory, "report": report}
        print(json.dumps(row, default=str) if args.json else row, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
