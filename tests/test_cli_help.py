"""The command line's surface: help on every option, a light parser, benchmarks that run installed,
and the README's command table in step with the parser."""
import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tca_attention import bench, cli
from tca_attention.clihelp import HelpFormatter, parser_tree

ROOT = Path(__file__).resolve().parent.parent


def _bench_parsers():
    for name, (module, _) in bench.SCRIPTS.items():
        mod = importlib.import_module(f"tca_attention.benchmarks.{module}")
        yield f"tca bench {name}", mod.build_parser(prog=f"tca bench {name}")
    mod = importlib.import_module("tca_attention.benchmarks.profile_decode")
    yield "profile_decode", mod.build_parser()


def _all_parsers():
    yield from parser_tree(cli.build_parser())
    yield from _bench_parsers()


def test_every_option_has_help_with_its_default():
    problems = []
    n = 0
    for path, parser in _all_parsers():
        formatter = HelpFormatter(prog=parser.prog)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = f"{path} {'/'.join(action.option_strings) or action.dest}"
            n += 1
            if isinstance(action, argparse._SubParsersAction):
                missing = [c.dest for c in action._choices_actions if not (c.help or "").strip()]
                if missing:
                    problems.append(f"{name}: subcommands without help: {missing}")
                continue
            if not (action.help or "").strip():
                problems.append(f"{name}: no help")
                continue
            shown = formatter._expand_help(action) if action.help else ""
            has_default = action.default is not None and action.default is not argparse.SUPPRESS and action.nargs != 0
            if has_default and "default" not in shown.lower():
                problems.append(f"{name}: default {action.default!r} not shown in {shown!r}")
    assert n > 60, n  # the walk saw the whole tree (tca, its commands, eval, bench and the benchmarks)
    assert not problems, "\n".join(problems)


def test_parser_builds_without_torch_or_transformers():
    code = ("import sys; import tca_attention.cli as c; c.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _tca_command() -> list[str]:
    script = Path(sys.executable).parent / "tca"
    if script.exists():
        return [str(script)]
    found = shutil.which("tca")
    return [found] if found else [sys.executable, "-m", "tca_attention.cli"]


def test_tca_help_is_fast(tmp_path):
    cmd = [*_tca_command(), "--help"]
    subprocess.run(cmd, capture_output=True, timeout=60)  # warm the file cache
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0 and "demo" in r.stdout and "bench" in r.stdout
    assert seconds < 3.0, f"tca --help took {seconds:.2f} s"


@pytest.mark.parametrize("name,option", [("kernels", "--contexts"), ("e2e", "--budgets"), ("passkey", "--depths")])
def test_bench_help_runs_outside_a_checkout(tmp_path, name, option):
    r = subprocess.run([*_tca_command(), "bench", name, "--help"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"usage: tca bench {name}" in r.stdout and option in r.stdout


def test_benchmark_modules_live_in_the_package():
    assert not (ROOT / "benchmarks").exists() or not any((ROOT / "benchmarks").glob("*.py"))
    src = (ROOT / "tca_attention" / "bench.py").read_text()
    assert "Path(__file__)" not in src and "runpy" not in src


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_bench_without_cuda_is_one_clear_line(capsys, tmp_path):
    for argv in (["bench", "kernels", "--out", str(tmp_path)],
                 ["bench", "e2e", "--budgets", "b.json", "--out", "r.json"],
                 ["bench", "passkey", "--out", "r.json"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "needs a CUDA GPU" in err and "Traceback" not in err


def test_kernels_plot_only_needs_no_gpu(tmp_path, capsys):
    src = ROOT / "docs" / "results" / "kernels_bench.json"
    assert src.exists(), "the recorded kernel benchmark is part of the repository"
    assert cli.main(["bench", "kernels", "--plot-only", str(src), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "kernels_prefill.png").exists()


def _readme_rows() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| command")]
    return [tuple(c.strip() for c in row.strip("|").split(" | ", 1)) for row in rows]


def test_readme_command_table_matches_the_parser():
    parser = cli.build_parser()
    subs = {path.split()[1]: p for path, p in parser_tree(parser) if len(path.split()) == 2}
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in subs.items()}
    rows = _readme_rows()
    seen = set()
    for command, what in rows:
        m = re.match(r"`tca ([\w-]+)", command)
        names = [m.group(1)] if m else re.findall(r"`(\w+)`", command)
        assert names, command
        for name in names:
            assert name in subs, f"README names `tca {name}`, which the parser does not have"
            seen.add(name)
            for opt in re.findall(r"(?<![\w-])--[a-z][a-z-]*", command + " " + what):
                if name == "bench" or opt == "--help":
                    continue
                if opt == "--json" and name == "calibrate":
                    continue  # the row says which commands have it
                assert opt in options[name], f"README: `tca {name}` has no option {opt}"
    assert seen == set(subs), f"README table lacks {set(subs) - seen}"
    demo = dict(rows)[next(c for c, _ in rows if c.startswith("`tca demo"))]
    assert f"({cli.DEMO_PASSKEY_TOKENS} tokens)" in demo
    bench_row = next(c for c, _ in rows if c.startswith("`tca bench"))
    assert "/".join(bench.SCRIPTS) in bench_row


def test_module_entry_point_help(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-m", "tca_attention.cli", "demo", "--help"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "--passkey TOKENS" in r.stdout and "--prompt-file" not in r.stdout


def test_bench_passkey_runs_from_the_package_on_a_tiny_model(tmp_path, smol_tokenizer, monkeypatch, capsys):
    """The one benchmark that also runs on the CPU, end to end through `tca bench passkey`."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    smol_tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "sweep.json"
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "passkey", "--model", str(tmp_path / "tiny"), "--device", "cpu", "--window", "64",
                     "--lengths", "400", "--depths", "0.5", "--seeds", "0", "--calib-length", "300",
                     "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["command"].startswith("tca bench passkey") and len(data["rows"]) == 7


def test_benchmarks_take_a_registry_method(capsys):
    """`--method SPEC` of the GPU benchmarks is checked before any GPU work (parsing only here)."""
    from tca_attention.benchmarks import bench_e2e, passkey_sweep

    args = bench_e2e.parse_args(["--method", "streaming:window=4096", "--out", "r.json"])
    assert (args.name, args.budgets, args.tau) == ("streaming", None, None)
    args = bench_e2e.parse_args(["--method", "tca:tau=0.7,dense_below=4096", "--budgets", "b.json", "--out", "r.json"])
    assert (args.name, args.tau, args.dense_below) == ("tca", 0.7, 4096)
    assert bench_e2e.parse_args(["--budgets", "b.json", "--out", "r.json"]).name == "tca"  # the default
    for argv, error in (
        (["--out", "r.json"], "--method tca needs --budgets FILE"),
        (["--method", "xattn", "--out", "r.json"], "unknown method 'xattn'"),
        (["--method", "streaming", "--tau", "0.5", "--out", "r.json"], "--tau: tca's options, but --method is streaming"),
        (["--method", "tca:tau=0.7", "--tau", "0.5", "--budgets", "b", "--out", "r"], "both set tau"),
        (["--method", "tca:window=64", "--budgets", "b", "--out", "r"], "only tau, score and dense_below"),
        (["--method", "full", "--out", "r.json"], "dense attention every method is timed against"),
    ):
        with pytest.raises(SystemExit) as e:
            bench_e2e.parse_args(argv)
        assert e.value.code == 2 and error in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        passkey_sweep.main(["--method", "streaming:window=big", "--out", "r.json"])
    assert "--method streaming:window=big: streaming: window='big' is not a valid int" in capsys.readouterr().err


def test_bench_methods_expands_and_checks_specs_before_gpu_work(capsys):
    """`tca bench methods` expands sweeps into normalised specs and refuses bad lists up front."""
    from tca_attention import registry
    from tca_attention.benchmarks import bench_methods

    args = bench_methods.parse_args(["--methods", "streaming:window=1024|4096; full-budget", "--lengths", "8192",
                                     "--out", "r.json"])
    assert args.specs == ["streaming:window=1024", "streaming:window=4096", "full-budget"]
    assert args.lengths == [8192]
    peers = bench_methods.parse_args(["--methods", "peers; full-budget", "--out", "r.json"]).specs
    assert "blasst:scale_factor=1000.0" in peers and "hip:k=8" in peers and peers[-1] == "full-budget"
    assert len(peers) == sum(len(registry.expand(s)) for s in bench_methods.PEER_SWEEPS.values()) + 1
    for bad, why in ((["--methods", "full; streaming"], "full is the dense"),
                     (["--methods", "tca:tau=0.7"], "needs --budgets"),
                     (["--methods", "nosuch"], "unknown method"),
                     (["--methods", "streaming:window=big"], "not a valid int"),
                     (["--methods", "streaming", "--lengths", "8k"], "comma list")):
        with pytest.raises(SystemExit) as e:
            bench_methods.parse_args([*bad, "--out", "r.json"])
        assert e.value.code == 2
        assert why in capsys.readouterr().err


def test_bench_methods_warms_each_row_up_at_its_length(monkeypatch):
    """Each row runs untimed at the same length before it is timed (unless --no-length-warmup); a
    failed warm-up or a failing row leaves its error in the row and the others are timed."""
    from tca_attention import registry
    from tca_attention.benchmarks import bench_methods as BM

    calls = []

    def fake_row(model, ids, method, steps, decode):
        calls.append((method, ids.shape[1], steps))
        if method == "broken":
            raise ValueError("no such kernel")
        return {"ttft_s": 1.0, "decode_tokens_per_s": float(steps)}

    monkeypatch.setattr(BM, "time_row", fake_row)
    ids = torch.zeros(1, 96, dtype=torch.long)
    methods = {"streaming:window=64": "m1", "quest:budget=32": "broken", "tidaldecode:budget=32": "m3"}
    args = BM.parse_args(["--methods", "streaming", "--decode-steps", "5", "--out", "r.json"])
    rows = BM.time_length(None, ids, methods, {"tidaldecode:budget=32": "RuntimeError: warm-up"}, args)
    assert [r["method"] for r in rows] == [registry.FULL, *methods]
    assert calls == [(None, 96, 2), (None, 96, 5), ("m1", 96, 2), ("m1", 96, 5), ("broken", 96, 2)]
    assert rows[1]["decode_tokens_per_s"] == 5.0 and rows[2]["error"] == "ValueError: no such kernel"
    assert rows[3]["error"] == "RuntimeError: RuntimeError: warm-up"
    calls.clear()
    args = BM.parse_args(["--methods", "streaming", "--decode-steps", "5", "--no-length-warmup", "--out", "r.json"])
    BM.time_length(None, ids, {"streaming:window=64": "m1"}, {}, args)
    assert calls == [(None, 96, 5), ("m1", 96, 5)]


def test_bench_methods_attended_fraction_is_the_sparsified_phase():
    from tca_attention.benchmarks.bench_methods import attended

    assert attended({"prefill_attended_fraction": 0.3, "decode_attended_fraction": 1.0}) == 0.3
    assert attended({"prefill_attended_fraction": 1.0, "decode_attended_fraction": 0.2}) == 0.2
    assert attended({}) == 1.0


@pytest.mark.parametrize("spec", [None, "streaming:window=64,sinks=4,block_size=16"])
def test_bench_methods_graph_row_on_the_cpu(spec):
    """--decode graph's timing of one row (static steps, eager on the CPU): dense on transformers'
    StaticCache, a method on its static ragged cache, with the row's accounting filled in."""
    from tca_attention import registry
    from tca_attention.benchmarks.bench_methods import _graph_safe, time_graph

    from tiny_models import tiny

    model = tiny("llama").eval()
    method = None if spec is None else registry.create(spec)
    from tca_attention.methods.full_budget import FullBudget

    class Undeclared(FullBudget):  # a per-step decode selection not declared graph-safe
        def select_decode(self, layer_idx, q, layer):
            return None

    assert _graph_safe(method) and _graph_safe(registry.create("quest:budget=64")) and not _graph_safe(Undeclared())
    ids = torch.randint(0, 97, (1, 300))
    row = time_graph(model, ids, method, 4)
    assert row["decode"] == "graph" and row["graphs"] == 0 and row["decode_tokens_per_s"] > 0
    if method is None:
        assert row["kept_fraction"] == 1.0 and row["kv_gib"] == row["dense_kv_gib"]
    else:  # 4 sinks + a 64-token window (+ a partial block) out of 303
        assert 0.1 < row["kept_fraction"] < 0.5 and row["kv_gib"] < row["dense_kv_gib"]
        assert row["prefill_attended_fraction"] < 0.6


def test_bench_methods_infiniretri_row_on_the_cpu():
    """`tca bench methods` times InfiniRetri as the eval runs it: its chunk forwards, then dense
    attention over the rewritten prompt (CPU: static steps run eagerly). The row holds less KV than
    the dense prompt would (exactly the dropped tokens' K and V less), decodes over the shorter
    prompt, and counts the chunk forwards' causal pairs against one dense prefill's."""
    from tca_attention import registry
    from tca_attention.benchmarks import bench_methods as BM

    from tiny_models import tiny

    model = tiny("llama").eval()
    method = registry.create("infiniretri:chunk=64,topk=4,phrase=3")
    L = 400
    ids = torch.randint(0, 97, (1, L))
    row = BM.time_row(model, ids, method, 3, "graph")
    context = L - BM.PREFIX_TOKENS - BM.SUFFIX_TOKENS
    assert row["chunk_steps"] == -(-context // 64) and 0 < row["retained_tokens"] < context
    n = BM.PREFIX_TOKENS + row["retained_tokens"] + BM.SUFFIX_TOKENS
    assert row["decode_attended_fraction"] == n / L and 0 < row["kept_fraction"] < 1
    dense = BM.time_row(model, ids, None, 3, "graph")
    assert row["dense_kv_gib"] == pytest.approx(dense["kv_gib"], rel=1e-6)  # the same static capacity, L + steps
    assert row["ttft_s"] == pytest.approx(row["retain_s"] + row["final_prefill_s"])
    assert row["prefill_attended_fraction"] > n * (n + 1) / (L * (L + 1))  # the chunk forwards count
    with pytest.raises(ValueError, match="one prompt of more than"):
        BM.time_row(model, ids[:, :50], method, 3, "graph")
    assert "infiniretri:topk=300" in BM.parse_args(["--methods", "peers", "--out", "r.json"]).specs


def test_bench_methods_times_stacked_calibrators():
    """ZeroTuning and ACT run through `tca bench methods` stacked on a method (`calibrators`: on
    TCA, so --budgets is asked for), build as the composite on the model, and plot as their own
    line (`tca+zerotuning`); a row of one runs on the CPU with its bias applied."""
    from tca_attention import registry
    from tca_attention.benchmarks import bench_methods as BM
    from tca_attention.methods.compose import Calibrated

    from tiny_models import tiny

    with pytest.raises(SystemExit):
        BM.parse_args(["--methods", "calibrators", "--out", "r.json"])  # tca without --budgets
    args = BM.parse_args(["--methods", "calibrators; streaming:window=64,sinks=4,block_size=16+act:heads=all",
                          "--budgets", "b.json", "--out", "r.json"])
    assert args.specs == ["tca+zerotuning:scale=1.5", "tca+act:heads=all",
                          "streaming:sinks=4,window=64,block_size=16+act:heads=all"]
    assert BM.family("tca:tau=0.7+zerotuning:scale=1.5") == "tca+zerotuning" and BM.family("hip:k=8") == "hip"
    model = tiny("llama").eval()
    method = BM.build_method(args.specs[2], model, args)
    assert isinstance(method, Calibrated) and method.base.name == "streaming"
    ids = torch.randint(0, 97, (1, 300))
    row = BM.time_row(model, ids, method, 3, "graph")
    assert row["decode_tokens_per_s"] > 0 and 0.1 < row["kept_fraction"] < 0.5
    assert registry.split(args.specs[0])[1] == "zerotuning:scale=1.5"
