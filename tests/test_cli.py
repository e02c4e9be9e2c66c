"""The `tca` command line end to end on tiny random models with a real tokenizer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tca_attention import cli, registry
from tca_attention.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--window", "64", "--block-size", "16"]


def _tiny(tok, path: Path, max_positions: int) -> Path:
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    """An 8K-style model: trained length 2048 (< 64K), SmolLM2's tokenizer."""
    return _tiny(smol_tokenizer, tmp_path_factory.mktemp("tiny"), 2048)


@pytest.fixture(scope="module")
def tiny_long_dir(tmp_path_factory, smol_tokenizer):
    """A 128K-style model (trained length 131072)."""
    return _tiny(smol_tokenizer, tmp_path_factory.mktemp("tiny_long"), 131072)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))


def test_calibrate_then_generate_json(tiny_dir, tmp_path, capsys):
    budgets = tmp_path / "b.json"
    args = ["--model", str(tiny_dir), *TINY]
    assert main(["calibrate", *args, "--length", "300", "--out", str(budgets)]) == 0
    out = capsys.readouterr().out
    assert "mean kept fraction" in out and budgets.exists()
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    assert main(["generate", *args, "--budgets", str(budgets), "--prompt-file", str(prompt),
                 "--question", "What jumps?", "--max-new-tokens", "4", "--tau", "0.3", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    full, tca = data["runs"]
    assert full["method"] == "full" and tca["method"] == "tca"
    assert full["prompt_tokens"] == tca["prompt_tokens"] > 500
    assert tca["kv_bytes"] < tca["dense_kv_bytes"] and 0 < tca["kv_ratio"] < 1
    assert 0 < tca["retained_last_query"] <= 1.0 and full["kv_ratio"] == 1.0
    # the quality certificate: per layer, and the largest bound over layers and heads
    assert tca["error_bound"] == max(c["bound_max"] for c in tca["certificate"]) >= 0
    assert tca["retained_last_query_min"] == min(c["retained_min"] for c in tca["certificate"])
    assert full["error_bound"] == 0.0
    assert data["config"]["window"] == 64 and data["config"]["tau"] == 0.3
    assert f"Using budgets {budgets}" in captured.err


def test_calibrate_several_texts_and_lengths(tiny_dir, tmp_path, capsys):
    """--samples/--lengths/--combine: one budget file from every (window, length), recorded; its
    notice says how many forwards; bad settings stop before the model loads."""
    budgets = tmp_path / "b.json"
    args = ["--model", str(tiny_dir), *TINY]
    assert main(["calibrate", *args, "--lengths", "300/400", "--samples", "2", "--combine", "min",
                 "--out", str(budgets)]) == 0
    captured = capsys.readouterr()
    assert "4 dense forwards (2 x 300/400 tokens)" in captured.err
    calib = json.loads(budgets.read_text())["calibration"]
    assert calib["combine"] == "min"
    assert [(s["tokens"], s["offset"]) for s in calib["samples"]] == [(300, 0), (300, 300), (400, 0), (400, 400)]
    assert main(["calibrate", *args, "--lengths", "300/300"]) == 2
    assert "distinct positive" in capsys.readouterr().err


def test_generate_selection_options_print_the_certificate(tiny_dir, tmp_path, capsys):
    budgets = tmp_path / "b.json"
    args = ["--model", str(tiny_dir), *TINY]
    assert main(["calibrate", *args, "--length", "300", "--out", str(budgets)]) == 0
    capsys.readouterr()
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    assert main(["generate", *args, "--budgets", str(budgets), "--prompt-file", str(prompt), "--mode", "tca",
                 "--method", "tca:last_q=4,floor=0.5", "--max-new-tokens", "2", "--tau", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "certificate of tca" in out and "bound max" in out


def test_generate_refuses_empty_prompt_and_foreign_budgets(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(SystemExit, match="empty prompt"):
        main(["generate", "--model", str(tiny_dir), "--prompt-file", str(empty)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["generate", "--model", str(tiny_dir), "--budgets", str(bad), "--question", "hi"]) == 2
    assert "corrupt budget file" in capsys.readouterr().err
    bad.write_text("[1, 2]")  # valid JSON, not an object
    assert main(["generate", "--model", str(tiny_dir), "--budgets", str(bad), "--question", "hi"]) == 2
    assert "expected a JSON object, got a list" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tmp_path / "missing")]) == 2
    assert main(["calibrate", "--model", str(tiny_dir), "--tau", "1.5"]) == 2
    assert main(["generate", "--model", str(tiny_dir), "--passkey", "300", "--question", "hi"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir)]) == 2
    assert "nothing to run" in capsys.readouterr().err


def test_generate_passkey_missed_exits_1_with_json_only_on_stdout(tiny_dir, capsys):
    """A random model misses the key: exit status 1; stdout is one JSON document."""
    rc = main(["generate", "--model", str(tiny_dir), *TINY, "--passkey", "300", "--max-new-tokens", "2", "--json"])
    captured = capsys.readouterr()
    assert rc == 1
    data = json.loads(captured.out)
    assert data["found"] == {"full": False, "tca": False} and data["expected"]
    assert "MISSED by full, tca" in captured.err


def test_demo_exit_status_follows_the_passkey(tiny_dir, capsys, monkeypatch):
    from tca_attention import generation

    real = generation.run_prompt
    answers = {}

    def found_by_full_only(model, tok, prompt, method, *a, **k):
        r = real(model, tok, prompt, method, *a, **k)
        key = prompt.split("The pass key is ")[1][:5]
        answers[r.method] = key if r.method == "full" else "nope"
        return type(r)(**{**r.__dict__, "answer": answers[r.method]})

    monkeypatch.setattr(generation, "run_prompt", found_by_full_only)
    args = ["demo", "--model", str(tiny_dir), *TINY, "--passkey", "300", "--max-new-tokens", "1"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "full: passkey" in out and "found" in out and "tca: passkey" in out and "MISSED" in out
    assert main([*args, "--mode", "full", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["found"] == {"full": True}


def test_demo_offers_the_passkey_job_only(capsys):
    parser = cli.build_parser()
    for opt in ("--prompt-file", "--question"):
        with pytest.raises(SystemExit):
            parser.parse_args(["demo", opt, "x"])
    assert parser.parse_args(["demo"]).passkey == cli.DEMO_PASSKEY_TOKENS
    assert parser.parse_args(["demo", "--passkey", "2000"]).passkey == 2000


def test_demo_json_subprocess_prints_only_json(tiny_dir, tmp_path):
    """The installed command, as a user pipes it: `tca demo --json | jq` must parse."""
    env = {**os.environ, "TCA_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "tca_attention.cli", "demo", "--model", str(tiny_dir), *TINY,
                        "--passkey", "300", "--max-new-tokens", "2", "--json"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stderr  # a random model misses the key
    data = json.loads(r.stdout)
    assert [x["method"] for x in data["runs"]] == ["full", "tca"]
    assert "Demo:" in r.stderr and "Calibrating ONCE" in r.stderr


def test_auto_preset_follows_the_trained_length(tiny_dir, tiny_long_dir, capsys):
    common = ["generate", "--question", "hello there", "--mode", "full", "--max-new-tokens", "1", "--json"]
    assert main([*common, "--model", str(tiny_dir)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["config"]["window"] == 512
    assert ("TCA preset 'small-context' (w=512): the model was trained on 2048 tokens; the paper's w=4096 "
            "suits 128K models. Override with --preset/--window.") in captured.err
    assert main([*common, "--model", str(tiny_long_dir)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["config"]["window"] == 4096
    assert "TCA preset 'default' (w=4096, the paper's): the model was trained on 131072 tokens" in captured.err
    for given in (["--preset", "small-context"], ["--window", "1024"]):  # the user's choice wins, silently
        assert main([*common, "--model", str(tiny_long_dir), *given]) == 0
        captured = capsys.readouterr()
        assert "TCA preset" not in captured.err
        assert json.loads(captured.out)["config"]["window"] == (512 if "--preset" in given else 1024)


def test_calibration_is_announced_then_the_cached_file_named(tiny_dir, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_dir), *TINY, "--question", "hi " * 100, "--mode", "tca",
            "--max-new-tokens", "1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "Calibrating ONCE for this model and config" in err and "on this CPU" in err
    cached = list((tmp_path / "cache" / "budgets").glob("*.json"))
    assert len(cached) == 1 and f"cached in {cached[0]}" in err
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"Using cached budgets {cached[0]}" in err and "Calibrating" not in err


def test_budget_file_options_fixed_by_calibration_must_agree(tiny_dir, tmp_path, capsys):
    budgets = tmp_path / "b.json"
    assert main(["calibrate", "--model", str(tiny_dir), *TINY, "--length", "300", "--out", str(budgets)]) == 0
    capsys.readouterr()
    rc = main(["generate", "--model", str(tiny_dir), "--budgets", str(budgets), "--window", "128",
               "--question", "hi", "--mode", "tca"])
    assert rc == 2 and "--window 128 (file: 64)" in capsys.readouterr().err


def test_cpu_float16_runs_as_float32_and_cuda_is_checked(tiny_dir, capsys):
    with pytest.warns(UserWarning, match="float16 on the CPU"):
        assert main(["generate", "--model", str(tiny_dir), "--dtype", "float16", "--question", "hi",
                     "--mode", "full", "--max-new-tokens", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["answer"] is not None
    if not torch.cuda.is_available():
        assert main(["generate", "--model", str(tiny_dir), "--device", "cuda", "--question", "hi"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_generate_runs_any_registry_method(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--question", "The quick brown fox. " * 40, "--max-new-tokens", "2",
            "--json"]
    assert main([*args, "--method", "streaming:window=64, block_size=16"]) == 0
    data = json.loads(capsys.readouterr().out)
    full, stream = data["runs"]
    assert full["method"] == "full" and stream["method"] == "streaming"
    assert data["method"] == "streaming:window=64,block_size=16"
    assert data["config"] == {"sinks": 4, "window": 64, "block_size": 16, "name": "streaming"}
    assert stream["prompt_tokens"] > 200 and stream["kv_bytes"] < stream["dense_kv_bytes"]
    assert main([*args, "--method", "streaming:window=64,block_size=16", "--mode", "method"]) == 0
    assert [r["method"] for r in json.loads(capsys.readouterr().out)["runs"]] == ["streaming"]


def test_generate_method_errors_are_clear(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--question", "hi", "--max-new-tokens", "1"]
    for extra, error in (
        (["--method", "xattn"], f"unknown method 'xattn'; known: {', '.join(registry.names())}"),
        (["--method", "streaming:windw=64"], "streaming: unknown parameter 'windw' (known: sinks, window, block_size)"),
        (["--method", "streaming:window=64", "--tau", "0.5", "--budgets", "b.json"],
         "--tau, --budgets: TCA options, but --method is streaming"),
        (["--method", "tca:tau=0.5", "--tau", "0.7"], "--tau 0.7 and --method tca:tau=0.5 disagree"),
        (["--method", "full"], "--method full is full attention: use --mode full"),
        (["--method", "tca:preset=huge"], "unknown TCA preset 'huge'"),
    ):
        assert main([*args, *extra]) == 2, extra
        assert error in capsys.readouterr().err, extra


def test_generate_tca_spec_sets_the_tca_options(tiny_dir, tmp_path, capsys):
    """--method tca:... is the TCA options in spec form: tau re-selects a budget file, window is checked."""
    budgets = tmp_path / "b.json"
    assert main(["calibrate", "--model", str(tiny_dir), *TINY, "--length", "300", "--out", str(budgets)]) == 0
    capsys.readouterr()
    args = ["generate", "--model", str(tiny_dir), "--question", "hi " * 100, "--max-new-tokens", "1", "--json",
            "--mode", "method"]
    assert main([*args, "--method", f"tca:tau=0.3,budgets={budgets},dense_below=64"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["tau"] == 0.3 and data["config"]["window"] == 64
    assert [r["method"] for r in data["runs"]] == ["tca"]
    assert main([*args, "--method", f"tca:window=128,budgets={budgets}"]) == 2
    assert "--window 128 (file: 64)" in capsys.readouterr().err


def test_probe_layers_prints_every_layer_and_its_choice(tiny_dir, tmp_path, capsys):
    budgets, state = tmp_path / "b.json", tmp_path / "probe.json"
    args = ["--model", str(tiny_dir), *TINY]
    assert main(["calibrate", *args, "--length", "300", "--out", str(budgets)]) == 0
    capsys.readouterr()
    assert main(["probe-layers", *args, "--budgets", str(budgets), "--tau", "0.5", "--options", "last_q=4,span=3",
                 "--length", "300", "--prompts", "1", "--out", str(state), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"] and all(0.0 <= float(r[1]) <= 1.0 for r in rows)
    assert "dense_at=auto with probe_min=0.9, probe_max_kl=0.05 keeps dense:" in out
    from tca_attention.methods.tca.layer_probe import LayerProbe

    saved = LayerProbe.load(state)
    assert saved.settings["options"] == {"last_q": 4, "span": 3} and saved.settings["tau"] == 0.5
    want = "/".join(map(str, saved.dense_layers(0.9))) or "none"
    assert next(l for l in out.splitlines() if "keeps dense:" in l).endswith(want)
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert main(["probe-layers", *args, "--budgets", str(budgets), "--min-agreement", "2"]) == 2
    assert main(["probe-layers", *args, "--budgets", str(budgets), "--options", "dense_at=1"]) == 2
    assert main(["probe-layers", *args, "--budgets", str(budgets), "--prompts", "0"]) == 2
