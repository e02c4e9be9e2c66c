"""Tensor-parallel end to end: time to first token, decode tokens/s and per-GPU peak memory on 1, 2, 4...
GPUs, dense vs a method, under transformers' tensor parallelism (docs/tensor_parallel.md).

Launch one process per GPU (NCCL; on a CPU the same runs with gloo, e.g. --shape tiny as a smoke run):
    torchrun --nproc_per_node 2 -m tca_attention.benchmarks.bench_tp --budgets B.json --out tp2.json
    (--nproc_per_node 1 is the one-GPU baseline, the same code path without a mesh)
then draw the runs together:
    python -m tca_attention.benchmarks.bench_tp --plot tp.png tp1.json tp2.json tp4.json
A Llama-3.1-8B-shaped model with random weights: every rank loads a folder holding the config and
one norm weight, and transformers initialises the missing weights on the rank's own shards (no 16 GB
checkpoint is written). TCA's budgets are a real calibration's, mapped onto the shape (as `tca bench e2e`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import registry
from ..clihelp import HelpFormatter

SHAPES = {
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=262144,
                     rope_theta=500000.0, tie_word_embeddings=False),
    # a smoke run on the CPU (tests): the same code path on a model of a few MB
    "tiny": dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
                 tie_word_embeddings=False),
}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--method", default="tca", metavar="SPEC",
                    help="the method timed against dense attention: a registry spec; tca needs --budgets")
    ap.add_argument("--budgets", help="budget file mapped onto the model's shape (from `tca calibrate --out FILE`)")
    ap.add_argument("--tau", type=float, default=None, help="re-select the budgets at this tau")
    ap.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES), help="model shape (random weights)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--lengths", default="131072,262144", help="comma list of prompt lengths in tokens")
    ap.add_argument("--decode-steps", type=int, default=32, help="decode steps timed after each prefill")
    ap.add_argument("--workdir", default=None, help="where each rank writes its random-model folder (default: a temp dir)")
    ap.add_argument("--out", help="result JSON (written by rank 0); required unless --plot")
    ap.add_argument("--plot", nargs="+", metavar="FILE", help="PNG then result JSON files: draw the runs together and exit")
    return ap


def _random_model_dir(config, workdir: str | None) -> Path:
    """A folder with the config and one weight: from_pretrained initialises every missing weight
    (on the rank's shards under tensor parallelism). One folder per local rank: no races."""
    from safetensors.torch import save_file

    rank = os.environ.get("LOCAL_RANK", "0")
    path = Path(workdir or tempfile.gettempdir()) / f"tca-bench-tp-{config.hidden_size}x{config.num_hidden_layers}-rank{rank}"
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_file({"model.norm.weight": torch.ones(config.hidden_size, dtype=torch.bfloat16)},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def load_model(shape: str, layers: int | None, workdir: str | None):
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.distributed import DistributedConfig

    from ..integration.adapter import LOAD_KWARGS

    config = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})})
    path = _random_model_dir(config, workdir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    place = {"distributed_config": DistributedConfig(tp_plan="auto")} if world > 1 else \
        {"device_map": "cuda" if torch.cuda.is_available() else "cpu"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
                                                 **place, **LOAD_KWARGS)
    return model.eval()


def build_method(args, model):
    name, _ = registry.parse_spec(args.method)
    if name != "tca":
        return registry.create(args.method, model=model), None
    if not args.budgets:
        raise SystemExit("--method tca needs --budgets FILE")
    from ..methods.tca.budgets import Budgets

    src = Budgets.load(args.budgets)
    budgets = (src.at(tau=args.tau) if args.tau is not None else src).mapped_onto(model)
    return registry.create("tca:dense_below=0", budgets=budgets), budgets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def time_rank(model, ids: torch.Tensor, method, decode_steps: int) -> dict:
    """One prefill + decode_steps greedy steps on this rank (every rank runs it together)."""
    from ..integration import enable

    dev = ids.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if cuda else 0
    with enable(model, method) as session:
        cache = session.new_cache()
        _sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **session.cache_kwargs(cache))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(dev)
        t1 = time.perf_counter()
        for _ in range(decode_steps):
            out = model(input_ids=nxt, use_cache=True, **session.cache_kwargs(cache))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(dev)
        t2 = time.perf_counter()
        mem = session.cache_report(cache)  # over every rank's heads (a collective)
        report = session.prefill_report() if not session.method.is_dense else {}
        local = cache.kv_bytes() if hasattr(cache, "kv_bytes") else sum(
            l.keys.nbytes + l.values.nbytes for l in cache.layers if getattr(l, "keys", None) is not None)
    del cache, out
    return {"ttft_s": t1 - t0, "decode_tokens_per_s": decode_steps / (t2 - t1) if decode_steps else None,
            "peak_mem_gib": (torch.cuda.max_memory_allocated(dev) - base) / 2**30 if cuda else None,
            "kv_gib_rank": local / 2**30, "kv_gib": mem["kv_bytes"] / 2**30, "kept_fraction": mem["kept_fraction"],
            "retained_last_query": report.get("retained"), "prefill_attended_fraction": report.get("kept_fraction", 1.0)}


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _over_ranks(rows: list[dict]) -> dict:
    """One rank's figures -> the run's: the slowest rank's TTFT and decode rate, each rank's peak memory."""
    peaks = [r["peak_mem_gib"] for r in rows]
    return {"ttft_s": max(r["ttft_s"] for r in rows),
            "decode_tokens_per_s": min(r["decode_tokens_per_s"] for r in rows) if rows[0]["decode_tokens_per_s"] else None,
            "peak_mem_gib_per_rank": peaks, "peak_mem_gib_max": max(peaks) if None not in peaks else None,
            "kv_gib_per_rank": [r["kv_gib_rank"] for r in rows], "kv_gib": rows[0]["kv_gib"],
            **{k: rows[0][k] for k in ("kept_fraction", "retained_last_query", "prefill_attended_fraction")}}


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run(args) -> int:
    from ..methods.dense import Dense

    model = load_model(args.shape, args.layers, args.workdir)
    method, budgets = build_method(args, model)
    dev = next(p for p in model.parameters()).device
    dev = torch.device(dev.type, dev.index) if dev.type == "cuda" else dev
    name = registry.parse_spec(args.method)[0]
    rank = dist.get_rank() if dist.is_initialized() else 0
    vocab = model.config.vocab_size
    warm = torch.randint(0, vocab, (1, min(8192, min(int(x) for x in args.lengths.split(",")))), device=dev)
    for m in (Dense(), method):  # kernels, handles, allocator
        time_rank(model, warm, m, 2)
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        gen = torch.Generator().manual_seed(L)
        ids = torch.randint(0, vocab, (1, L), generator=gen).to(dev)  # the same prompt on every rank
        row: dict = {"tokens": L}
        for key, m in (("dense", Dense()), (name, method)):
            try:
                row[key] = _over_ranks(_gather(time_rank(model, ids, m, args.decode_steps)))
            except torch.OutOfMemoryError as e:  # the ranks fail together (the same shapes)
                row[key] = {"error": f"OOM: {e}".splitlines()[0]}
                torch.cuda.empty_cache()
        if "ttft_s" in row["dense"] and "ttft_s" in row[name]:
            row["ttft_speedup"] = row["dense"]["ttft_s"] / row[name]["ttft_s"]
            if row[name]["decode_tokens_per_s"]:
                row["decode_speedup"] = row[name]["decode_tokens_per_s"] / row["dense"]["decode_tokens_per_s"]
        if rank == 0:
            print(json.dumps(row), flush=True)
        rows.append(row)
    if rank == 0:
        meta = {"world": _world(), "backend": dist.get_backend() if dist.is_initialized() else None,
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "torch": torch.__version__, "python": platform.python_version(),
                "transformers": __import__("transformers").__version__,
                "model": {"shape": args.shape, **SHAPES[args.shape], "num_hidden_layers": model.config.num_hidden_layers,
                          "weights": f"random {str(next(model.parameters()).dtype).removeprefix('torch.')}"},
                "method": registry.normalize(args.method), "decode_steps": args.decode_steps,
                "budgets": None if budgets is None else {"file": args.budgets, "tau": budgets.config.tau,
                                                         "mean_kept_fraction": budgets.mean_kept_fraction},
                "multicast_env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                                 "NVSHMEM_DISABLE_NVLS")},
                "command": " ".join(sys.argv)}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


def plot(png: str, files: list[str]) -> None:
    """TTFT, decode tokens/s and the largest per-GPU peak memory vs prompt length, one line per
    (world size, dense or method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((json.loads(Path(f).read_text()) for f in files), key=lambda r: r["meta"]["world"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run_ in runs:
        meta, rows = run_["meta"], run_["rows"]
        name = registry.parse_spec(meta["method"])[0]
        for series, style in (("dense", "--"), (name, "-")):
            ok = [r for r in rows if "ttft_s" in r[series]]
            x = [r["tokens"] / 1024 for r in ok]
            for ax, key in zip(axes, ("ttft_s", "decode_tokens_per_s", "peak_mem_gib_max")):
                y = [r[series][key] for r in ok]
                if None in y:  # no memory figures on a CPU
                    continue
                ax.plot(x, y, style, marker="o",
                        label=f"{meta['world']} rank{'s' if meta['world'] > 1 else ''}, {series}")
    for ax, label in zip(axes, ("time to first token (s)", "decode tokens/s", "peak memory per GPU over weights (GiB)")):
        if ax.get_lines():
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
        ax.set_xlabel("prompt tokens (K)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    m = runs[0]["meta"]
    fig.suptitle(f"Tensor parallel: {m['device']}, {m['model']['shape']} shape ({m['model']['weights']}), "
                 f"{m['method']}; one line per world size and series", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = build_parser(prog)
    args = ap.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.plot:
        if len(args.plot) < 2:
            ap.error("--plot PNG JSON [JSON ...]")
        plot(args.plot[0], args.plot[1:])
        return 0
    if not args.out:
        ap.error("--out is required")
    try:
        registry.parse_spec(args.method)
    except (KeyError, ValueError) as e:
        ap.error(f"--method {args.method}: {e.args[0]}")
    try:
        return run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
