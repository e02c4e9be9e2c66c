"""The transformers adapter: its convention table, unknown call shapes, and the per-forward check
that turns a missed cache into an error instead of a silently wrong answer."""
import inspect
import warnings

import pytest
import torch
import transformers

from tca_attention.methods.tca.config import TCAConfig
from tca_attention.integration import adapter, enable
from tca_attention.integration.adapter import AdapterError, cache_kwargs
from tca_attention.integration.hf import CacheNotUsedError, tca_attention_forward
from tca_attention.methods.full_budget import FullBudget
from tca_attention.methods.tca.method import TCA
from test_cache_and_errors import fake_budgets
from tiny_models import ARCHS, tiny

pytestmark = pytest.mark.compat


def test_convention_table():
    assert adapter.convention("5.23.0").cache_kwarg == "past_key_values"
    assert adapter.convention("5.24.0").cache_kwarg == "cache"
    assert adapter.convention("5.25.0").cache_kwarg == "cache"
    for outside in ("5.22.2", "5.26.0"):
        with pytest.warns(UserWarning, match="outside the range"):
            adapter.check_version(outside)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.check_version("5.24.0")


@pytest.mark.parametrize("arch", ARCHS)
def test_installed_release_matches_the_convention(arch):
    """The keyword the adapter uses is the one this release's attention modules take."""
    model = tiny(arch)
    attn = model.model.layers[-1].self_attn
    params = inspect.signature(type(attn).forward).parameters
    assert adapter.convention().cache_kwarg in params, (
        f"transformers {transformers.__version__}: {type(attn).__name__}.forward takes {list(params)}")


def test_no_deprecation_warning_from_our_calls():
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 120))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad(), enable(model, FullBudget(window=32, block_size=16)) as s:
            out = s.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 124)
    assert s.cache.kv_bytes() > 0 and all(l.calls.decodes == 3 for l in s.cache.tca_layers())


def test_unknown_attention_call_shape_is_an_error():
    model = tiny("llama")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 6, 10, 16)
    k = v = torch.randn(1, 2, 10, 16)
    with enable(model, FullBudget(window=32, block_size=16)):
        with pytest.raises(AdapterError, match=rf"transformers {transformers.__version__}.*\(batch, heads"):
            tca_attention_forward(attn, q[0], k, v, None)  # 3-D query
        with pytest.raises(AdapterError, match="shapes do not fit"):
            tca_attention_forward(attn, q, torch.randn(1, 4, 10, 16), v, None)  # 4 KV heads for 6 q heads
        with pytest.raises(AdapterError, match="attention_mask of type"):
            tca_attention_forward(attn, q, k, v, "causal")


def test_attention_module_called_without_a_cache_keyword_is_an_error():
    model = tiny("llama")
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(1, 10, 96)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(10)[None])
    with torch.no_grad(), enable(model, FullBudget(window=32, block_size=16)):
        with pytest.raises(AdapterError, match=rf"transformers {transformers.__version__}.*without a cache keyword"):
            attn(hidden_states=hidden, position_embeddings=cos_sin, attention_mask=None)


def test_a_broken_adapter_fails_loudly(monkeypatch):
    """The 5.24 bug, on purpose: the hooks never find the cache. The forward must raise."""
    monkeypatch.setattr(adapter, "cache_of_module_call", lambda kwargs: None)
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 120))
    with torch.no_grad(), enable(model, FullBudget(window=32, block_size=16)) as s:
        with pytest.raises(CacheNotUsedError, match=rf"transformers {transformers.__version__}: layer 0 stored"):
            model(input_ids=ids, **cache_kwargs(s.new_cache()))


def test_a_cache_given_under_the_wrong_name_is_refused():
    """Every release takes our cache only under its own keyword; a wrong name must not run cacheless."""
    model = tiny("llama")
    wrong = "past_key_values" if adapter.convention().cache_kwarg == "cache" else "cache"
    with torch.no_grad(), enable(model, FullBudget(window=32, block_size=16)) as s:
        cache = s.new_cache()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                model(input_ids=torch.randint(0, 97, (1, 60)), **{wrong: cache})
            except (TypeError, ValueError, AdapterError):
                return  # refused outright (5.23 forwards an unknown `cache=` down to attention): fine
        # accepted through a deprecation shim: then the cache must really have been used
        assert all(l.calls.commits == 1 for l in cache.tca_layers()) and cache.kv_bytes() > 0


@pytest.mark.parametrize("prompt_len", [40, 47])  # stays dense: L <= w + b = 48
def test_a_prompt_that_stays_dense_never_holds_more_than_a_dense_cache(prompt_len):
    from transformers.cache_utils import DynamicCache

    model = tiny("llama")
    config = TCAConfig(block_size=16, window=32)
    ids = torch.randint(0, 97, (1, prompt_len + 60))
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :prompt_len], **cache_kwargs(dense))
        with enable(model, TCA(fake_budgets(model, config))) as s:
            cache = s.new_cache()
            model(input_ids=ids[:, :prompt_len], **cache_kwargs(cache))
            dense_bytes = sum(l.keys.nbytes + l.values.nbytes for l in dense.layers)
            assert cache.kv_bytes() == cache.dense_kv_bytes() == dense_bytes
            for t in range(prompt_len, prompt_len + 60):  # through the first compressions
                model(input_ids=ids[:, t : t + 1], **cache_kwargs(cache))
                assert cache.kv_bytes() <= cache.dense_kv_bytes(), f"step {t}"
    assert all(l.g_pos.numel() > 0 for l in cache.tca_layers()), "decode compression never ran"
    assert cache.kv_bytes() < cache.dense_kv_bytes()


def test_long_prompt_holds_less_than_dense_at_every_step():
    model = tiny("qwen2")
    config = TCAConfig(block_size=16, window=32)
    ids = torch.randint(0, 97, (2, 260))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    with torch.no_grad(), enable(model, TCA(fake_budgets(model, config, score=0.95))) as s:
        cache = s.new_cache()
        model(input_ids=ids[:, :200], attention_mask=mask[:, :200], **cache_kwargs(cache))
        for t in range(200, 260):
            model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(cache))
            assert cache.kv_bytes() < cache.dense_kv_bytes(), f"step {t}"


def test_all_dense_layers_keep_a_dense_cache():
    """Budgets where no candidate reaches tau: every head dense, the cache is exactly dense."""
    model = tiny("llama")
    budgets = fake_budgets(model, TCAConfig(block_size=16, window=32)).at(tau=0.99)
    with torch.no_grad(), enable(model, TCA(budgets)) as s:
        cache = s.new_cache()
        model(input_ids=torch.randint(0, 97, (1, 300)), **cache_kwargs(cache))
        assert cache.kv_bytes() == cache.dense_kv_bytes()
        assert s.prefill_report()["kept_fraction"] == 1.0
        for _ in range(40):
            model(input_ids=torch.randint(0, 97, (1, 1)), **cache_kwargs(cache))
            assert cache.kv_bytes() == cache.dense_kv_bytes()


def test_softcapping_and_unknown_keywords_are_refused():
    from tca_attention.introspect import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="softcapping"):
        enable(tiny("gemma2", attn_logit_softcapping=50.0), FullBudget())
    model = tiny("llama")
    attn = model.model.layers[0].self_attn
    q, k = torch.randn(1, 6, 10, 16), torch.randn(1, 2, 10, 16)
    with torch.no_grad(), enable(model, FullBudget(window=32, block_size=16)) as s:
        s._caches[attn] = None  # as if the module's pre-hook had seen use_cache=False
        with pytest.raises(AdapterError, match="cu_seq_lens_q"):
            tca_attention_forward(attn, q, k, k, None, cu_seq_lens_q=torch.tensor([0, 10]))
        with pytest.raises(AdapterError, match="sliding_window=8"):
            tca_attention_forward(attn, q, k, k, None, sliding_window=8)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_runs_tca_and_really_holds_only_the_kept_tokens(arch):
    model = tiny(arch)
    config = TCAConfig(block_size=16, window=32)
    with torch.no_grad(), enable(model, TCA(fake_budgets(model, config))) as s:
        ids = torch.randint(3, 97, (1, 300))  # no pad/bos/eos ids inside the prompt
        out = s.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                         do_sample=False)
    assert out.shape[1] == 320
    for layer in s.cache.tca_layers():
        assert layer.calls.snapshot() == (20, 1, 19)  # one prefill committed, 19 decode steps over the cache
        kept = layer.g_pos.numel() + layer.t_fill * layer.t_keys.shape[1]
        assert kept == layer.kept_tokens() < 0.3 * layer.dense_tokens()
    assert s.cache.kv_bytes() < 0.4 * s.cache.dense_kv_bytes()


def test_a_cache_holding_nothing_after_a_prefill_is_an_error(monkeypatch):
    from tca_attention.ragged_cache import RaggedLayer

    monkeypatch.setattr(RaggedLayer, "kv_bytes", lambda self: 0)
    model = tiny("llama")
    with torch.no_grad(), enable(model, FullBudget(window=32, block_size=16)) as s:
        with pytest.raises(CacheNotUsedError, match=r"layer 0 holds 0 bytes after a prefill"):
            model(input_ids=torch.randint(0, 97, (1, 60)), **cache_kwargs(s.new_cache()))
