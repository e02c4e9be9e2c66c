"""The attention calibrators (ZeroTuning, ACT) stacked on methods (compose.Calibrated): scale 1 /
beta 1 equal the base method exactly, hand-built cases, their calibrations and state files, and
composition with full, streaming and tca through tca.create and the eval pipeline."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from method_checks import run
from test_eval_pipeline import tiny_llama

import tca_attention as tca
from tca_attention import registry
from tca_attention.engine import dispatch
from tca_attention.engine.plan import KeyBias
from tca_attention.integration import enable
from tca_attention.methods import act as act_mod, zerotuning as zt_mod
from tca_attention.methods.act import ACT
from tca_attention.methods.compose import Calibrated, Search
from tca_attention.methods.dense import Dense
from tca_attention.methods.state import HeadTable, ModelIdentity, StateError
from tca_attention.methods.streaming import StreamingLLM
from tca_attention.methods.zerotuning import ZeroTuning
from tiny_models import tiny


def batch(L: int = 90, pads=(0, 9), steps_n: int = 6, vocab: int = 97):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (len(pads), L), generator=gen)
    mask = torch.ones(len(pads), L, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return ids, mask, torch.randint(0, vocab, (len(pads), steps_n), generator=gen)


def logits(model, method, ids, mask, steps):
    with torch.no_grad(), enable(model, method, backend="reference") as s:
        return run(model, ids, mask, steps, s)


# -- neutral settings equal the base ---------------------------------------------------------------
BASES = {"streaming": "streaming:sinks=4,window=32,block_size=16",  # TokenPlan, evicting cache
         "xattention": "xattention:threshold=0.8,stride=4,block_size=16",  # BlockPlan
         "token-sparse": "token-sparse:coverage=0.8,min_tokens=8,recent=8"}  # SubsetPlan


# neutral settings, and settings that change the answer (random weights have no sink above 0.1)
CALIBRATORS = {"zerotuning:scale=1.0": "zerotuning:scale=0.3", "act:heads=all,beta=1.0": "act:heads=all,threshold=0.02"}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("calibrator", CALIBRATORS)
def test_neutral_calibration_equals_the_base_exactly(base, calibrator):
    model = tiny("llama")
    ids, mask, steps = batch()
    want = logits(model, tca.create(BASES[base]), ids, mask, steps)
    got = logits(model, tca.create(f"{BASES[base]}+{calibrator}"), ids, mask, steps)
    valid = mask.bool()
    assert torch.equal(got[0][valid], want[0][valid]) and torch.equal(got[1], want[1])
    moved = logits(model, tca.create(f"{BASES[base]}+{CALIBRATORS[calibrator]}"), ids, mask, steps)
    assert not torch.allclose(moved[0][valid], want[0][valid], atol=1e-4)  # a real scale changes the answer


def test_full_with_scale_one_equals_dense():
    model = tiny("llama")
    ids, mask, steps = batch()
    want = run(model, ids, mask, steps)  # plain transformers SDPA, DynamicCache
    got = logits(model, tca.create("full+zerotuning:scale=1.0"), ids, mask, steps)
    valid = mask.bool()
    torch.testing.assert_close(got[0][valid], want[0][valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-4)


def test_a_real_scale_changes_prefill_and_decode_the_same_way():
    """full+zerotuning:scale=3 over the ragged cache equals plain SDPA with the same bias on the
    first token, prefill and decode (the additive mask built here by hand)."""
    model = tiny("llama")
    ids, mask, steps = batch(pads=(0, 5))
    got = logits(model, tca.create("full+zerotuning:scale=3.0"), ids, mask, steps)
    plain = run(model, ids, mask, steps)
    assert not torch.allclose(got[1], plain[1], atol=1e-3)

    from transformers.integrations import sdpa_attention as sd

    first = (1 - mask).sum(-1)  # each row's first real token

    def biased(module, q, k, v, attention_mask, **kw):  # bool mask (B, 1, Q, K) -> + log 3 on the first token
        m = torch.zeros(attention_mask.shape, dtype=q.dtype).masked_fill(~attention_mask, float("-inf"))
        col = torch.arange(m.shape[-1])[None, :] == first[:, None]
        m = m + torch.where(col, math.log(3.0), 0.0)[:, None, None, :]
        return orig(module, q, k, v, m, **kw)

    orig = sd.sdpa_attention_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("transformers.integrations.sdpa_attention.sdpa_attention_forward", biased)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        mp.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", biased)
        want = run(model, ids, mask, steps)
    valid = mask.bool()
    torch.testing.assert_close(got[0][valid], want[0][valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


# -- hand-built cases ---------------------------------------------------------------------------
def test_zerotuning_biases_each_rows_first_token():
    state = HeadTable("zerotuning", _ident(), ((0.5, 1.0, 2.0, 4.0),))
    q, k = torch.zeros(2, 4, 10, 16), torch.zeros(2, 2, 10, 16)
    kb = ZeroTuning(state).key_bias(0, q, k, torch.tensor([0, 3]), 0.25)
    assert kb.pos.tolist() == [[[0]] * 4, [[3]] * 4]
    torch.testing.assert_close(kb.bias[:, :, 0], torch.log(torch.tensor([0.5, 1.0, 2.0, 4.0])).expand(2, 4))


def test_act_finds_a_hidden_sink_and_matches_its_formula():
    """Key 5 is a hidden sink (attention above 0.1), key 0 (the first token) is larger but excepted.
    With the last query as the one sampled query, its biased attention equals ACT's exactly: the sink
    x beta, the others x (1 - beta S) / (1 - S); queries before the sink are unchanged."""
    L, D, beta = 40, 16, 0.4
    q = torch.zeros(1, 1, L, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, L, D)
    k[0, 0, 0, 0], k[0, 0, 5, 0] = 3.0, 2.0  # logits 3 (first token), 2 (hidden sink), 0 elsewhere
    v = torch.randn(1, 1, L, D)
    kb = ACT(heads="all", beta=beta, queries=1).key_bias(0, q, k, torch.tensor([0]), 1.0)
    assert [p for p in kb.pos[0, 0].tolist() if p >= 0] == [5]
    out = dispatch.dense_prefill(q, k, v, 1.0, kb)[0, :, 0]  # (L, D)
    w = torch.softmax(torch.tensor([3.0] + [0.0] * 4 + [2.0] + [0.0] * (L - 6)), 0)
    S = float(w[5])
    want_w = w * (1 - beta * S) / (1 - S)
    want_w[5] = beta * w[5]
    torch.testing.assert_close(out[L - 1], want_w @ v[0, 0], atol=1e-5, rtol=1e-5)
    w = torch.softmax(torch.tensor([3.0] + [0.0] * 3), 0)
    torch.testing.assert_close(out[3], w @ v[0, 0, :4], atol=1e-5, rtol=1e-5)
    # several sampled queries: the bias is ACT's at their mean sink mass
    kb8 = ACT(heads="all", beta=beta, queries=8).key_bias(0, q, k, torch.tensor([0]), 1.0)
    assert kb8.pos[0, 0, 0] == 5 and kb8.bias[0, 0, 0] < math.log(beta)  # exp(b) = beta (1 - S) / (1 - beta S)


# -- calibration, state, cache ------------------------------------------------------------------
def _ident(layers: int = 1, heads: int = 4) -> ModelIdentity:
    return ModelIdentity("llama", "x", layers, heads, 2, 16, 64, 97, (0.1,) * 8)


def test_calibrations_run_cache_and_refuse_another_models_state(tmp_path: Path, smol_tokenizer, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny_llama(len(smol_tokenizer))
    zt = tca.create("zerotuning:length=48", model=model, tokenizer=smol_tokenizer)
    ac = tca.create("streaming:window=32,block_size=16+act:length=48,granularity=layer", model=model,
                    tokenizer=smol_tokenizer)
    assert isinstance(zt, Calibrated) and isinstance(zt.base, Dense) and zt.name == "full+zerotuning"
    assert isinstance(ac.base, StreamingLLM) and isinstance(ac.calibrator, ACT)
    err = capsys.readouterr().err
    assert "Calibrating zerotuning ONCE" in err and "Calibrating act ONCE" in err
    files = sorted((tmp_path / "calibrators").glob("*.json"))
    assert len(files) == 2
    for f in files:  # the calibrations record what they did; scales are positive; ACT marks 0 / 1
        data = json.loads(f.read_text())
        state = HeadTable.load(f, data["method"], model=model)
        values = {x for row in state.layers if row for x in row}
        assert data["calibration"]["baseline"] >= data["calibration"]["best"]
        assert values <= ({0.0, 1.0} if data["method"] == "act" else set(zt_mod.UP_SCALES + zt_mod.DOWN_SCALES) | {1.0})
    tca.create("tca:tau=0.5+zerotuning:length=48", model=model, tokenizer=smol_tokenizer,
               budgets=_budgets(model, smol_tokenizer))  # the cached state is reused
    assert "Using cached zerotuning state" in capsys.readouterr().err
    other = tiny_llama(len(smol_tokenizer))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    zt_file = next(f for f in files if "-zerotuning-" in f.name)
    with pytest.raises(StateError, match="another model"):
        tca.create(f"zerotuning:state={zt_file}", model=other)
    with pytest.raises(StateError, match="not 'zerotuning'"):
        tca.create(f"zerotuning:state={next(f for f in files if '-act-' in f.name)}", model=model)


def _budgets(model, tok):
    from tca_attention.integration.probe import load_or_calibrate
    from tca_attention.methods.tca.config import TCAConfig

    return load_or_calibrate(model, tok, "tiny", TCAConfig(block_size=16, window=64, tau=0.9), length=256,
                             announce=False)


def test_zerotuning_search_keeps_what_helps(monkeypatch):
    """With a fake probe whose objective is known, the three steps pick the dominant kind and its best gamma."""
    model = tiny_llama(97)

    class Probe:
        def __init__(self):
            self.model = model

        def evaluate(self, ids, method):
            if not isinstance(method, Calibrated):
                return {"nll": 1.0, "entropy": 1.0}
            scales = method.calibrator.state.layers
            # heads 0-2 of every layer like larger scales (best at 2), head 3 is hurt by any change
            val = 1.0 + sum(-0.01 * (1 - (s - 2.0) ** 2 / 4) if h < 3 else 0.02 * abs(s - 1)
                            for row in scales for h, s in enumerate(row) if s != 1.0)
            return {"nll": val, "entropy": val}

    class Tok:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(2, 90))}

    state = zt_mod.calibrate(Probe(), Tok(), Search(length=16, samples=1), progress=False)
    c = state.calibration
    assert (c["up_units"], c["down_units"], c["kind"], c["gamma"]) == (6, 2, "up", 2.0)
    assert state.layers == ((2.0, 2.0, 2.0, 1.0),) * 2  # only the up-effective heads, at the best gamma
    assert c["gain"] == pytest.approx(0.06)


def test_head_table_files_are_validated(tmp_path: Path):
    good = HeadTable("act", _ident(), ((1.0, 0.0, 0.0, 1.0),), {"x": 1})
    path = good.save(tmp_path / "a.json")
    assert HeadTable.load(path, "act") == good
    data = json.loads(path.read_text())
    for change, match in ((lambda d: d.update(version=9), "version"),
                          (lambda d: d.update(layers=[[1.0, 0.0]]), "4 finite numbers"),
                          (lambda d: d.update(layers=[]), "1 entries"),
                          (lambda d: d["model"].pop("head_dim"), "missing"),
                          (lambda d: d.update(method="zerotuning"), "not 'act'")):
        d = json.loads(json.dumps(data))
        change(d)
        (tmp_path / "b.json").write_text(json.dumps(d))
        with pytest.raises(StateError, match=match):
            HeadTable.load(tmp_path / "b.json", "act")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(StateError, match="cannot read"):
        HeadTable.load(tmp_path / "c.json", "act")


# -- composition through the registry and the eval -----------------------------------------------
def test_specs_compose_and_bad_specs_raise():
    assert registry.normalize("act") == "full+act"
    assert registry.normalize(" tca:tau=0.70 + zerotuning:scale=2 ") == "tca:tau=0.7+zerotuning:scale=2.0"
    assert registry.at_density("streaming+act:heads=all", 0.5, 1000).startswith("streaming:window=")
    assert registry.expand("tca:tau=0.5|0.9+act:heads=all") == ["tca:tau=0.5+act:heads=all", "tca:tau=0.9+act:heads=all"]
    m = tca.create("streaming:window=1024+act:heads=all")
    assert isinstance(m, Calibrated) and m.base.window == 1024 and m.name == "streaming+act"
    for bad, match in (("zerotuning+tca", "goes after the method"), ("tca+streaming", "not an attention calibrator"),
                       ("tca+", "missing around"), ("act+zerotuning", "two calibrators"),
                       ("tca+act+zerotuning", "one calibrator"), ("full+act:heads=all,beta=2", "beta must lie"),
                       ("full+zerotuning:scale=-1", "scale must be"), ("full+act:heads=some", "heads must be"), ("full+act:heads=all,granularity=x", "granularity"),
                       ("full+zerotuning", "needs its calibration"), ("full+act", "needs its calibration"),
                       ("full+zerotuning:objective=acc,scale=2", "objective")):
        with pytest.raises((ValueError, KeyError), match=match):
            tca.create(bad)
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        tca.create("tca+nope")


def test_eval_runs_composites(tmp_path: Path, smol_tokenizer, monkeypatch):
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from tca_attention.methods.tca.config import TCAConfig

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_llama(len(smol_tokenizer))
    backend = ModelBackend("tiny-llama", model=model, tokenizer=smol_tokenizer,
                           tca_config=TCAConfig(block_size=16, window=64, tau=0.9), calibration_length=256)
    methods = ("full", "full+zerotuning:scale=1.5", "tca:tau=0.5+zerotuning:scale=1.5",
               "streaming:window=64,block_size=16+act:heads=all", "streaming:block_size=16+act:heads=all@match=tca:tau=0.5+zerotuning:scale=1.5")
    cfg = EvalConfig(model="tiny-llama", methods=methods, tasks=("perplexity",), lengths=(384,), samples=1)
    results = evaluate(cfg, backend, tmp_path, progress=False)
    by = {r.method: r for r in results}
    assert set(by) == set(methods)
    full, zt = by["full"], by["full+zerotuning:scale=1.5"]
    assert zt.kept_fraction == 1.0 and zt.nll != full.nll  # the bias changed the answer, nothing was dropped
    tz = by["tca:tau=0.5+zerotuning:scale=1.5"]
    assert 0 < tz.kept_fraction < 0.95 and tz.kv_bytes < tz.dense_kv_bytes  # TCA's selection still holds
    matched = by["streaming:block_size=16+act:heads=all@match=tca:tau=0.5+zerotuning:scale=1.5"]
    assert matched.metadata["window"] < 384
    assert all(r.nll is not None and 0 < r.nll < 20 for r in results)


def test_act_bias_does_not_depend_on_head_chunks_or_padding(monkeypatch):
    """Sinks found a few heads at a time equal those found at once; a left-padded row finds the same
    sinks (shifted by its padding) with the same biases as alone."""
    gen = torch.Generator().manual_seed(3)
    B, H, KV, L, D, pad = 2, 6, 2, 50, 16, 7
    q, k = torch.randn(B, H, L, D, generator=gen), torch.randn(B, KV, L, D, generator=gen)
    k[:, :, 12] *= 4  # a likely hidden sink
    k[1, :, pad + 12] = k[0, :, 12]
    q[1, :, pad:], k[1, :, pad:] = q[0, :, : L - pad], k[0, :, : L - pad]  # row 1: row 0 shifted by `pad`
    act = ACT(heads="all", threshold=0.05, queries=9)  # fewer sampled queries than tokens
    whole = act.key_bias(0, q, k, torch.tensor([0, pad]), 0.25)
    monkeypatch.setattr(act_mod, "_CHUNK_ELEMENTS", 1)  # one head at a time
    assert torch.equal(act.key_bias(0, q, k, torch.tensor([0, pad]), 0.25).pos, whole.pos)
    assert (whole.pos >= 0).any()
    short = act.key_bias(0, q[:1, :, : L - pad], k[:1, :, : L - pad], torch.tensor([0]), 0.25)
    got, P = whole.pos[1], short.pos.shape[-1]
    assert torch.equal(torch.where(got >= 0, got - pad, -1)[..., :P], short.pos[0])
    assert (got[..., P:] == -1).all()
    torch.testing.assert_close(whole.bias[1, :, :P], short.bias[0])


def test_cli_generate_runs_a_composite(tmp_path: Path, smol_tokenizer, monkeypatch, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tca_attention.cli import main

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    smol_tokenizer.save_pretrained(tmp_path / "tiny")
    spec = "streaming:window=32,block_size=16+act:heads=all"
    args = ["generate", "--model", str(tmp_path / "tiny"), "--question", "The quick brown fox. " * 20,
            "--max-new-tokens", "3", "--json", "--backend", "reference", "--method", spec]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == spec and data["runs"][1]["method"] == "streaming+act"


def test_static_decode_applies_the_bias_like_the_dynamic_cache():
    """A calibrated method decodes the same greedy tokens through the static (graph-capturable) cache
    as through the dynamic one, its bias kept on every static layer."""
    from test_batch_invariance import greedy
    from test_static_decode import left_padded

    from tca_attention.integration.static_decode import greedy_static

    model = tiny("llama")
    ids, mask = left_padded((120, 75))
    method = Calibrated(StreamingLLM(sinks=4, window=32, block_size=16), ZeroTuning(scale=3.0))
    with torch.no_grad(), enable(model, method, backend="reference") as session:
        _, _, want, _ = greedy(model, ids, mask, 12, session)
        run = greedy_static(model, ids, mask, max_new_tokens=13, session=session)
    assert torch.equal(run.sequences[:, ids.shape[1]: -1], want)
    assert all(layer.key_bias is not None for layer in run.cache.tca_layers())
