"""Bad input gets a clear error: budget files of the wrong shape, float16 on the CPU."""
import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tca_attention.methods.tca.budgets import BudgetError, Budgets
from tca_attention.models import check_model_dtype, load_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "docs" / "results" / "budgets" / "smollm2-small-context-8k.json"


@pytest.fixture(scope="module")
def good() -> dict:
    return json.loads(SAMPLE.read_text())


def _changed(data: dict, path: str, value=None, delete: bool = False) -> dict:
    out = copy.deepcopy(data)
    *head, last = path.split(".")
    node = out
    for k in head:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if delete:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def test_the_sample_file_loads(good):
    b = Budgets.from_json(good)
    assert b.model.num_layers == len(b.layers) == 30 and 0 < b.mean_kept_fraction < 1


@pytest.mark.parametrize("value,message", [
    ([1, 2], "expected a JSON object, got a list"),
    ("budgets", "expected a JSON object, got a string"),
    (None, "expected a JSON object, got null"),
    (3, "expected a JSON object, got a number"),
])
def test_not_an_object(tmp_path, value, message):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(value))
    with pytest.raises(BudgetError, match=message):
        Budgets.load(path)


@pytest.mark.parametrize("path,value,delete,message", [
    ("format", "something-else", False, "not a tca-attention budget file"),
    ("version", 2, False, "version 2 is not supported"),
    ("version", "1", False, "version '1' is not supported"),
    ("version", True, False, "version True is not supported"),
    ("layers", None, True, "missing key"),
    ("model", None, True, "missing key"),
    ("model", [], False, "model must be an object, got a list"),
    ("model.num_layers", None, True, "model is missing key.*num_layers"),
    ("model.extra", 1, False, "model has unknown key.*extra"),
    ("model.num_layers", "30", False, "model.num_layers must be a positive integer"),
    ("model.num_kv_heads", 2.5, False, "model.num_kv_heads must be a positive integer"),
    ("model.name", 5, False, "model.name must be a string"),
    ("model.fingerprint", "abc", False, "model.fingerprint must be a list of numbers"),
    ("config", "small", False, "config must be an object"),
    ("config.window", "512", False, "config.window has the wrong type"),
    ("config.tau", None, False, "config.tau has the wrong type"),
    ("config.mass_norm", None, True, "config is missing key.*mass_norm"),
    ("config.tau", 1.5, False, "config: tau must be in"),
    ("config.bogus", 1, False, "config has unknown key"),
    ("candidates", {}, False, "candidates must be a non-empty list"),
    ("candidates.0", ["x"], False, r"candidates\[0\] must be a list of numbers"),
    ("layers", {}, False, "layers must be a list"),
    ("layers.0", "dense", False, r"layers\[0\] must be a list of heads or null"),
    ("layers.0.0", [], False, r"layers\[0\]\[0\] must be an object"),
    ("layers.0.0.observation", None, True, r"layers\[0\]\[0\] has no 'observation'"),
    ("layers.0.0.column_mean", [0.5, None], False, r"layers\[0\]\[0\].column_mean must be a list of numbers"),
    ("calibration", [], False, "calibration must be an object"),
])
def test_wrong_fields_are_named(good, tmp_path, path, value, delete, message):
    file = tmp_path / "b.json"
    file.write_text(json.dumps(_changed(good, path, value, delete)))
    with pytest.raises(BudgetError, match=message):
        Budgets.load(file)


def test_structure_mismatches_and_non_json(good, tmp_path):
    with pytest.raises(BudgetError, match="layers for a 30-layer model"):
        Budgets.from_json({**good, "layers": good["layers"][:3]})
    file = tmp_path / "b.json"
    file.write_bytes(b"\xff\xfe not text")
    with pytest.raises(BudgetError, match="not JSON"):
        Budgets.load(file)
    with pytest.raises(BudgetError, match="is a directory"):
        Budgets.load(tmp_path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_dtype")
    LlamaForCausalLM(cfg).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def test_float16_on_the_cpu_loads_as_float32_with_a_warning(tiny_dir):
    with pytest.warns(UserWarning, match="float16 on the CPU is not supported"):
        model, _ = load_model(str(tiny_dir), dtype=torch.float16, device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    with pytest.warns(UserWarning, match="float16"):
        model, _ = load_model(str(tiny_dir), dtype="float16")
    assert next(model.parameters()).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bfloat16 answers correctly on the CPU: kept, no warning
        model, _ = load_model(str(tiny_dir), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    check_model_dtype(model)
    with pytest.raises(ValueError, match="float16 on the CPU"):
        check_model_dtype(model.to(torch.float16))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tiny_dir), dtype="float17")
