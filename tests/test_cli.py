"""The `tca` command line end to end on a tiny random model with a real tokenizer."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tca_attention.cli import main
from tca_attention.models import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    _, tok = load_model("smollm2")  # only its tokenizer is used
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_calibrate_then_generate_json(tiny_dir, tmp_path, capsys):
    budgets = tmp_path / "b.json"
    args = ["--model", str(tiny_dir), "--window", "64", "--block-size", "16"]
    assert main(["calibrate", *args, "--length", "300", "--out", str(budgets)]) == 0
    out = capsys.readouterr().out
    assert "mean kept fraction" in out and budgets.exists()
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    assert main(["generate", *args, "--budgets", str(budgets), "--prompt-file", str(prompt),
                 "--question", "What jumps?", "--max-new-tokens", "4", "--tau", "0.3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    full, tca = data["runs"]
    assert full["method"] == "full" and tca["method"] == "tca"
    assert full["prompt_tokens"] == tca["prompt_tokens"] > 500
    assert tca["kv_bytes"] < tca["dense_kv_bytes"] and 0 < tca["kv_ratio"] < 1
    assert 0 < tca["retained_last_query"] <= 1.0 and full["kv_ratio"] == 1.0


def test_generate_refuses_empty_prompt_and_foreign_budgets(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(SystemExit, match="empty prompt"):
        main(["generate", "--model", str(tiny_dir), "--prompt-file", str(empty)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["generate", "--model", str(tiny_dir), "--budgets", str(bad), "--question", "hi"]) == 2
    assert "corrupt budget file" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tmp_path / "missing")]) == 2
    assert main(["calibrate", "--model", str(tiny_dir), "--tau", "1.5"]) == 2
