"""Every method side by side, end to end on a GPU: time to first token, decode tokens/s, KV and
attended fractions, each next to dense attention in the same run.

The model is Llama-3.1-8B-shaped with random weights (bench_e2e.build_model): a method's cost is
set by how much it keeps and attends to, not by the weights. Methods are registry specs separated
by ';', with sweeps (`key=a|b|c`), so each method's density knob can be swept and the methods
compared at equal attended work. TCA takes a budget file mapped onto the model's heads (as
`tca bench e2e`); a method calibrated on the model (head-split, duo, razor, moa) takes its state file
via the spec only if it belongs to this model, so on random weights `--synthetic-state` gives it
seeded random head scores (gates): fine for timing (its cost depends only on how many heads keep
everything), never for accuracy.
Usage: tca bench methods --budgets B.json --methods "tca; xattention:threshold=0.8|0.9; spatten:keep=0.25|0.5" --out r.json
Usage: tca bench methods --budgets B.json --methods "tca; xattention:threshold=0.8|0.9" --out r.json
`--methods peers` (alone or in the list) stands for every peer's density sweep in PEER_SWEEPS;
`calibrators` for ZeroTuning and ACT stacked on TCA (CALIBRATOR_SWEEPS; needs --budgets).
`--decode graph` decodes each method whose decode is graph-safe (`supports_static_decode()`) and
dense attention with CUDA-graph-captured static steps (integration/static_decode.py; the prefill
then fills the static cache, one prefill per row); the others decode eagerly, and each row says
which (`decode`). List `full-budget` too for the engine's dense graph decode (every token kept):
rows then carry `decode_speedup_vs_keep_all` as well.
A method that reads the prompt in chunks and rewrites it (InfiniRetri, `reads_in_chunks`) is timed
as the eval runs it (`time_read_in_chunks`): its chunk forwards, then dense attention over the
rewritten prompt; its TTFT is both, its decode the dense decode of the shorter prompt. On random
token ids the context has no sentences, so one is marked every SENTENCE_TOKENS tokens.
Each row runs once untimed at its length before it is timed (`--no-length-warmup` skips that):
some kernels specialise on the length (split counts rounded to powers of two), and without the
warm-up the first row to use one at a new length paid its compile (up to 0.2 s of a 0.7 s TTFT).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from .. import registry
from ..clihelp import HelpFormatter
from ..methods.tca.budgets import Budgets
from . import require_cuda
from .bench_e2e import LLAMA_8B, build_model, time_one


# Each peer's density knob swept over the range its paper and our evals use (`--methods peers`).
PEER_SWEEPS: dict[str, str] = {
    "xattention": "xattention:threshold=0.9|0.95",
    "flexprefill": "flexprefill:gamma=0.9|0.95",
    "minference": "minference:pattern=vertical-slash,scale=0.5|1",  # forced pattern: no search on random weights
    "quest": "quest:budget=4096|16384",
    "head-split": "head-split:retrieval_fraction=0.25|0.5",
    "duo": "duo:retrieval_fraction=0.25|0.5",  # the paper's 25% / 50% retrieval heads (75% / 50% sparsity)
    "razor": "razor:retrieval_fraction=0.15|0.3",  # 0.15: the paper's default share of protected heads
    "streaming": "streaming:window=4096",
    "blasst": "blasst:scale_factor=100|1000|10000",
    "hip": "hip:k=8|32|128",  # at 128K: 1.3%, 3.6%, 12.6% of the causal pairs
    "longheads": "longheads:chunks=16|64",  # 16 chunks of 256: the paper's 4K attention length
    "dhsa": "dhsa:budget=2048|8192",  # the paper's LongBench budget, and 4x
    "token-sparse": "token-sparse:keep=0.25|0.5",
    "spatten": "spatten:keep=0.25|0.5",
    "tokenselect": "tokenselect:budget=2048|8192",  # the paper's top-k (2048 + 128 sinks + 512 local), and 4x
    "tidaldecode": "tidaldecode:budget=2048|4096",  # the paper's token budgets
    "recycled": "recycled:budget=2048|8192",  # stride 10
    "moa": "moa:density=0.25|0.5",  # mean kept KV fraction (the paper evaluates at 0.5)
    "infiniretri": "infiniretri:topk=300",  # the authors' default (chunk 1024, phrase 8)
}

# `--methods calibrators`: the attention calibrators stacked on TCA (so they need --budgets), in their
# state-free forms: a calibrated state belongs to a real model, and the cost is one key bias per head
# either way (ACT on every head: an upper bound on its cost)
CALIBRATOR_SWEEPS: dict[str, str] = {
    "zerotuning": "tca+zerotuning:scale=1.5",
    "act": "tca+act:heads=all",
}
KEYWORDS = {"peers": PEER_SWEEPS, "calibrators": CALIBRATOR_SWEEPS}

# time_read_in_chunks' synthetic prompt: a short prefix (the template before the context), the
# context with a sentence end every SENTENCE_TOKENS tokens (English prose: ~20-30 tokens a
# sentence), then a suffix holding a QUESTION_TOKENS-token question and the answer opener
PREFIX_TOKENS, SUFFIX_TOKENS, QUESTION_TOKENS, SENTENCE_TOKENS = 16, 48, 32, 24


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--methods", required=True,
                    help="registry specs separated by ';' with sweeps key=a|b (see `tca methods`); `peers` = every "
                         "peer's sweep, `calibrators` = ZeroTuning and ACT stacked on tca; required")
    ap.add_argument("--budgets", default=None, help="TCA budget file mapped onto the model (needed when tca is listed)")
    ap.add_argument("--lengths", default="32768,131072", help="comma list of prompt lengths in tokens")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the model")
    ap.add_argument("--decode-steps", type=int, default=32, help="decode steps timed after each prefill")
    ap.add_argument("--decode", choices=("eager", "graph"), default="eager",
                    help="eager: a Python forward per token for every method; graph: CUDA-graph replay for dense "
                    "and every method that supports static decode (the others eager)")
    ap.add_argument("--no-length-warmup", dest="length_warmup", action="store_false",
                    help="time each row without first running it once, untimed, at the same length (the warm-up "
                    "compiles the kernels whose specialisation depends on the length: without it the first row of a "
                    "kernel at each length pays its compile)")
    ap.add_argument("--synthetic-state", action="store_true",
                    help="methods calibrated on real text get seeded random state (timing only)")
    ap.add_argument("--out", required=True, help="result JSON path (the plot goes next to it as .png); required")
    return ap


def parse_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    """Options with every spec expanded and checked before any GPU work."""
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    specs: list[str] = []
    try:
        for text in filter(None, (t.strip() for t in args.methods.split(";"))):
            for sweep in KEYWORDS[text].values() if text in KEYWORDS else (text,):
                specs += [registry.normalize(s) for s in registry.expand(sweep)]
    except (KeyError, ValueError) as e:
        ap.error(f"--methods: {e.args[0]}")
    if registry.FULL in specs:
        ap.error("--methods: full is the dense attention every method is timed against; leave it out")
    if any(registry.parse_spec(registry.split(s)[0])[0] == "tca" for s in specs) and not args.budgets:
        ap.error("--methods lists tca: it needs --budgets FILE")
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--lengths {args.lengths!r}: a comma list of token counts")
    args.specs = specs
    return args


def _graph_safe(method) -> bool:
    """Dense attention (None) and every method whose decode step can be captured."""
    return method is None or method.supports_static_decode()


@torch.no_grad()
def time_graph(model, ids: torch.Tensor, method, decode_steps: int) -> dict:
    """As bench_e2e.time_one, decoding with CUDA-graph-captured static steps (greedy_static: the
    prefill fills the static cache; 1 eager step, 1 warm-up, capture, then the timed replays)."""
    from ..integration import enable
    from ..integration.static_decode import greedy_static

    cuda = ids.is_cuda  # the same steps run eagerly on the CPU (tests)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    with enable(model, method) as session:
        run = greedy_static(model, ids, max_new_tokens=decode_steps + 3, session=None if method is None else session)
        cache = run.cache
        if method is None:
            kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            dense_kv, kept, report = kv, 1.0, {}
        else:
            kv, dense_kv, kept = cache.kv_bytes(), cache.dense_kv_bytes(), cache.kept_fraction()
            report = session.prefill_report()
    ttft, tps, graphs = run.prefill_s, run.decode_tokens_per_s, run.graphs
    del cache, run  # the static cache goes before the next row's prefill
    return {
        "ttft_s": ttft, "decode_tokens_per_s": tps, "decode": "graph",
        "graphs": graphs, "peak_mem_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None,
        "kv_gib": kv / 2**30, "dense_kv_gib": dense_kv / 2**30, "kept_fraction": kept,
        "retained_last_query": report.get("retained"),
        "prefill_attended_fraction": report.get("kept_fraction", 1.0),
        "decode_attended_fraction": report.get("decode_kept_fraction", kept),
    }


@torch.no_grad()
def time_read_in_chunks(model, ids: torch.Tensor, method, decode_steps: int, decode: str) -> dict:
    """A row for a method that rewrites the prompt (`reads_in_chunks`: InfiniRetri): its chunk
    forwards (`retain`, timed), then dense attention over prefix + retained + suffix (time_row
    with `decode`: "graph" or "eager"). TTFT = both; decode = dense over the rewritten cache;
    kept fraction = the KV the generation holds over what the whole prompt's would (the eval's
    accounting); decode attended fraction = rewritten / original prompt; prefill attended fraction =
    the causal pairs of every chunk forward and the final prefill over the original prompt's
    (chunked reading can do more work than one dense pass)."""
    import time

    from ..integration.probe import ModelProbe
    from ..methods.infiniretri import retain

    B, L = ids.shape
    if B != 1 or L < PREFIX_TOKENS + SUFFIX_TOKENS + 1:
        raise ValueError(f"{method.name} is timed on one prompt of more than {PREFIX_TOKENS + SUFFIX_TOKENS} "
                         f"tokens, got {tuple(ids.shape)}")
    row_ids = ids[0].tolist()
    prefix, suffix = row_ids[:PREFIX_TOKENS], row_ids[L - SUFFIX_TOKENS:]
    context = row_ids[PREFIX_TOKENS:L - SUFFIX_TOKENS]
    ends = [(i + 1) % SENTENCE_TOKENS == 0 for i in range(len(context))]
    q0 = (SUFFIX_TOKENS - QUESTION_TOKENS) // 2
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    kept, info = retain(ModelProbe(model), method, prefix, context, ends, suffix, (q0, q0 + QUESTION_TOKENS))
    sync()
    retain_s = time.perf_counter() - t0
    rewritten = torch.tensor([prefix + kept + suffix], device=ids.device)
    row = time_row(model, rewritten, None, decode_steps, decode)
    n = rewritten.shape[1]
    pairs = sum((PREFIX_TOKENS + s["read"] + SUFFIX_TOKENS) * (PREFIX_TOKENS + s["read"] + SUFFIX_TOKENS + 1) / 2
                for s in info["steps"]) + n * (n + 1) / 2
    dense_kv = row["kv_gib"] + _full_layer_kv_bytes_per_token(model) * (L - n) / 2**30  # + the tokens dropped
    return {**row, "ttft_s": retain_s + row["ttft_s"], "retain_s": retain_s, "final_prefill_s": row["ttft_s"],
            "dense_kv_gib": dense_kv, "kept_fraction": row["kv_gib"] / dense_kv,
            "prefill_attended_fraction": pairs / (L * (L + 1) / 2), "decode_attended_fraction": n / L,
            "chunk_steps": len(info["steps"]), "retained_tokens": info["retained_tokens"],
            "synthetic_sentences": f"one every {SENTENCE_TOKENS} context tokens"}


def _full_layer_kv_bytes_per_token(model) -> int:
    """K and V bytes one token adds to a dense cache over the full-attention layers (sliding layers
    hold their window whatever the prompt)."""
    from ..introspect import layer_kinds, text_config

    cfg = text_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    size = next(model.parameters()).element_size()
    return sum(kind == "full" for kind in layer_kinds(model)) * 2 * cfg.num_key_value_heads * head_dim * size


def time_row(model, ids: torch.Tensor, method, decode_steps: int, decode: str) -> dict:
    """One row: dense (method None) or a method, graph-decoded where it can be and asked for."""
    if getattr(method, "reads_in_chunks", False):
        return time_read_in_chunks(model, ids, method, decode_steps, decode)
    if decode == "graph" and _graph_safe(method):
        return time_graph(model, ids, method, decode_steps)
    return {**time_one(model, ids, method, decode_steps), "decode": "eager"}


def build_method(spec: str, model, args: argparse.Namespace):
    """The method a spec names, for `model`: tca from the budget file (re-selected at the spec's
    tau/score, dense_below 0 unless set), others through the registry; a stacked calibrator
    (`base+zerotuning:scale=1.5`, `base+act:heads=all`) on top of either (on random weights only
    its state-free forms: a calibrated state belongs to a real model)."""
    base, cal = registry.split(spec)
    stack = "" if cal is None else registry.COMPOSE + cal
    name, params = registry.parse_spec(base)
    if name == "tca":
        budgets = Budgets.load(args.budgets)
        changes = {k: params.pop(k) for k in ("tau", "score") if k in params}
        budgets = (budgets.at(**changes) if changes else budgets).mapped_onto(model)
        params.setdefault("dense_below", "0")
        return registry.create(registry.format_spec(name, params) + stack, budgets=budgets)
    if name in SYNTHETIC and args.synthetic_state:
        return registry.create(spec, model=model, **SYNTHETIC[name](model))
    return registry.create(spec, model=model)


def _random_head_scores(model, seed: int = 0) -> dict:
    """head-split's state with seeded random scores for every KV head of `model` (timing only)."""
    from ..introspect import text_config
    from ..methods.head_split import HeadScores
    from ..methods.state import ModelIdentity

    cfg = text_config(model)
    gen = torch.Generator().manual_seed(seed)
    layers = tuple(tuple(torch.rand(cfg.num_key_value_heads, generator=gen).tolist())
                   for _ in range(cfg.num_hidden_layers))
    return {"scores": HeadScores(ModelIdentity.of(model), layers, calibration={"synthetic": f"random, seed {seed}"})}


def _random_moa_profile(model, seed: int = 0) -> dict:
    """MoA's profile with seeded random influence tails for every KV head of `model` (timing only)."""
    from ..introspect import layer_kinds, text_config
    from ..methods.moa import MoAProfile
    from ..methods.state import ModelIdentity

    cfg = text_config(model)
    gen = torch.Generator().manual_seed(seed)
    block, lengths = 64, (8192, 16384)

    def head(n: int) -> tuple[float, ...]:  # a random non-increasing tail, 0 past the last block
        return tuple(torch.rand(n // block, generator=gen).flip(0).cumsum(0).flip(0).tolist()) + (0.0,)

    tails = tuple(tuple(None if kind != "full" else tuple(head(n) for _ in range(cfg.num_key_value_heads))
                        for kind in layer_kinds(model)) for n in lengths)
    return {"profile": MoAProfile(ModelIdentity.of(model), block, lengths, tails,
                                  calibration={"synthetic": f"random, seed {seed}"})}



def _random_rows(model, seed: int) -> tuple:
    """Seeded random numbers in [0, 1), one per KV head of every layer of `model`."""
    from ..introspect import text_config

    cfg = text_config(model)
    gen = torch.Generator().manual_seed(seed)
    return tuple(tuple(torch.rand(cfg.num_key_value_heads, generator=gen).tolist()) for _ in range(cfg.num_hidden_layers))


def _random_gates(model, seed: int = 0) -> dict:
    """duo's state with seeded random gates (timing only)."""
    from ..methods.duo import DuoGates
    from ..methods.state import ModelIdentity

    return {"gates": DuoGates(ModelIdentity.of(model), _random_rows(model, seed),
                              calibration={"synthetic": f"random, seed {seed}"})}


def _random_razor_scores(model, seed: int = 0) -> dict:
    """razor's state with seeded random echo and induction scores (timing only)."""
    from ..methods.razor import RazorScores
    from ..methods.state import ModelIdentity

    return {"scores": RazorScores(ModelIdentity.of(model), _random_rows(model, seed), _random_rows(model, seed + 1),
                                  calibration={"synthetic": f"random, seeds {seed}, {seed + 1}"})}


# methods calibrated on the model -> seeded random state for `model` (timing only)
SYNTHETIC = {"head-split": _random_head_scores, "duo": _random_gates, "razor": _random_razor_scores,
             "moa": _random_moa_profile}


def time_length(model, ids: torch.Tensor, methods: dict, failed: dict[str, str],
                args: argparse.Namespace) -> list[dict]:
    """The rows of one prompt (`ids`): dense attention, then each method; a method that fails (or
    failed its warm-up: `failed`) gets its error in its row and the others go on. With
    `args.length_warmup` each row runs once untimed (2 decode steps) before it is timed."""
    rows = []
    for spec, m in ((registry.FULL, None), *methods.items()):
        row = {"tokens": ids.shape[1], "method": spec}
        try:
            if spec in failed:
                raise RuntimeError(failed[spec])
            if args.length_warmup:
                time_row(model, ids, m, 2, args.decode)
            row.update(time_row(model, ids, m, args.decode_steps, args.decode))
        except torch.OutOfMemoryError as e:
            row["error"] = f"OOM: {e}".splitlines()[0]
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - recorded in the row, the run goes on
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    if (rc := require_cuda("tca bench methods")) is not None:
        return rc
    model = build_model(args.layers)
    methods = {spec: build_method(spec, model, args) for spec in args.specs}
    warm = torch.randint(0, 1000, (1, 8192), device="cuda")
    failed: dict[str, str] = {}
    for spec, m in ((registry.FULL, None), *methods.items()):  # kernel compilation, cuBLAS handles
        try:
            time_row(model, warm, m, 2, args.decode)
        except Exception as e:  # noqa: BLE001 - one broken method must not lose the others' figures
            failed[spec] = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"warm-up of {spec} failed: {failed[spec]}", file=sys.stderr, flush=True)
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "versions": _versions(),
        "model": {"shape": "Llama-3.1-8B", **LLAMA_8B, "num_hidden_layers": args.layers, "weights": "random bf16"},
        "dtype": "bfloat16", "batch": 1, "budgets": args.budgets, "synthetic_state": args.synthetic_state,
        "dense_attention": "transformers sdpa (torch's default backend choice), " + (
            "StaticCache, CUDA-graph decode" if args.decode == "graph" else "DynamicCache, eager decode"),
        "decode_steps": args.decode_steps,
        "length_warmup": args.length_warmup,
        "command": "tca bench methods " + " ".join(argv),
    }
    rows = []
    for L in args.lengths:
        ids = torch.randint(0, LLAMA_8B["vocab_size"], (1, L), device="cuda")
        rows += time_length(model, ids, methods, failed, args)
        dense = rows[-len(methods) - 1]
        keep_all = next((r for r in rows[-len(methods):] if r["method"] == "full-budget" and "ttft_s" in r), None)
        for row in rows[-len(methods):]:
            if "ttft_s" in row and "ttft_s" in dense:
                row["ttft_speedup"] = dense["ttft_s"] / row["ttft_s"]
                row["decode_speedup"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
            if "ttft_s" in row and keep_all is not None:
                row["decode_speedup_vs_keep_all"] = row["decode_tokens_per_s"] / keep_all["decode_tokens_per_s"]
            print(json.dumps({k: row.get(k) for k in ("tokens", "method", "ttft_s", "ttft_speedup", "decode_speedup",
                                                      "kept_fraction", "prefill_attended_fraction",
                                                      "decode_attended_fraction")}), flush=True)
        with open(args.out, "w") as f:  # after every length: a cut-off run keeps what it measured
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        plot(rows, meta, args.out.rsplit(".", 1)[0] + ".png")
    return 0


def _versions() -> dict:
    import transformers
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__}


def family(spec: str) -> str:
    """A row's plot line: the method's name, with its stacked calibrator's (`tca+zerotuning`)."""
    base, cal = registry.split(spec)
    name = registry.parse_spec(base)[0]
    return name if cal is None else name + registry.COMPOSE + registry.parse_spec(cal)[0]


def attended(row: dict) -> float:
    """The smaller of a row's prefill and decode attended fractions: the work a method sparsifies
    (a prefill-only method reads its whole cache in decode, a decode-only one prefills densely)."""
    return min(row.get("prefill_attended_fraction") or 1.0, row.get("decode_attended_fraction") or 1.0)


def plot(rows: list[dict], meta: dict, path: str) -> None:
    """Per prompt length: TTFT and decode speed-up over dense vs attended fraction, one line per
    method family (a density sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(2, len(lengths), figsize=(5 * len(lengths), 8), squeeze=False)
    for j, L in enumerate(lengths):
        fams: dict[str, list[dict]] = {}
        for r in rows:
            if r["tokens"] == L and "ttft_speedup" in r:
                fams.setdefault(family(r["method"]), []).append(r)
        for i, key in enumerate(("ttft_speedup", "decode_speedup")):
            ax = axes[i][j]
            for fam, rs in sorted(fams.items()):
                rs = sorted(rs, key=attended)
                ax.plot([100 * attended(r) for r in rs], [r[key] for r in rs], marker="o", label=fam)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("attended fraction (%)")
            ax.set_ylabel(("TTFT" if i == 0 else "decode tokens/s") + " speed-up over dense")
            ax.set_title(f"{L // 1024}K tokens", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Methods vs dense, {meta['model']['shape']} ({meta['model']['num_hidden_layers']} layers, "
                 f"random weights), {meta['device']}, bf16, batch 1", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
