"""The embedded real model (SmolLM2-135M-Instruct, from PyPI, offline): calibration and a
4K-token passkey answered by TCA at tau = 0.9 with most of the prompt really compressed."""
import json

import pytest
import torch

from tca_attention.methods.tca.budgets import Budgets
from tca_attention import calibrate
from tca_attention.methods.tca.config import SMALL_CONTEXT
from tca_attention.data.passkey import passkey_prompt
from tca_attention.generation import run_prompt
from tca_attention.methods.tca.method import TCA
from tca_attention.models import load_model

# one xdist worker runs the module (`--dist loadgroup`), so the real model is calibrated once, not per worker
pytestmark = pytest.mark.xdist_group("real_smollm2")


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model("smollm2")


@pytest.fixture(scope="module")
def budgets(smollm2):
    model, tok = smollm2
    return calibrate(model, tok, SMALL_CONTEXT, length=4096, progress=False)


def test_calibration_budget_file(budgets, smollm2, tmp_path):
    model, _ = smollm2
    assert budgets.config.tau == 0.9 and budgets.config.window == 512
    assert budgets.calibration["tokens"] == 4096 and len(budgets.calibration["text_sha256"]) == 64
    assert len(budgets.layers) == 30 and all(len(h) == 3 for h in budgets.layers)
    data = json.loads(budgets.save(tmp_path / "b.json").read_text())
    head = data["layers"][5][0]
    assert len(head["column_mean"]) == 14 and len(head["observation"]) == 14
    if head["choice"] is not None:
        assert head["retained"] >= 0.9
        assert all(a < 0.9 for a in head["column_mean"][: head["choice"]]), "the cheapest passing candidate"
    # retained score grows with the candidate's expected keep (more kept, more mass)
    scores = torch.tensor([h.column_mean for layer in budgets.layers for h in layer])
    assert float((scores[:, -1] - scores[:, 0]).min()) >= -1e-6
    assert 0.05 < budgets.mean_kept_fraction < 0.95
    assert Budgets.load(tmp_path / "b.json", model=model) == budgets


def test_passkey_4k_answered_with_tca_and_cache_shrinks(smollm2, budgets):
    model, tok = smollm2
    pk = passkey_prompt(tok, 4096, depth=0.5, seed=0)
    r = run_prompt(model, tok, pk.text, TCA(budgets), max_new_tokens=7)
    assert pk.answer in r.answer, f"TCA answered {r.answer!r}, expected {pk.answer}"
    # w = 512 of ~4K tokens: most of the prompt is outside the window and really compressed
    assert r.kv_bytes < 0.85 * r.dense_kv_bytes, (r.kv_bytes, r.dense_kv_bytes)
    assert r.kept_fraction < 0.85
    assert r.retained_last_query is not None and r.retained_last_query > 0.9
