"""The ragged cache holds what it reports, shrinks for real, and bad input fails clearly."""
import pytest
import torch

from tca_attention.methods.tca.budgets import BudgetError, Budgets, HeadBudget
from tca_attention.methods.state import ModelIdentity
from tca_attention.ragged_cache import RaggedLayer
from tca_attention.methods.tca.candidates import candidate_ladder
from tca_attention.methods.tca.config import TCAConfig
from tca_attention.generation import run_prompt
from tca_attention.integration import enable
from tca_attention.introspect import UnsupportedModelError
from tca_attention.methods.streaming import StreamingLLM
from tca_attention.methods.tca.method import TCA
from tca_attention.integration.adapter import cache_kwargs
from tiny_models import tiny


def fake_budgets(model, config: TCAConfig, score: float = 0.95) -> Budgets:
    """Budgets where every head's cheapest candidate already passes tau (maximal compression)."""
    ladder = candidate_ladder(config.block_size)
    M = ladder.shape[0]
    hb = HeadBudget(tuple([score] * M), tuple([score] * M))
    cfgm = model.config
    return Budgets(
        model=ModelIdentity.of(model),
        config=config,
        candidates=tuple(tuple(r) for r in ladder.tolist()),
        layers=tuple(tuple([hb] * cfgm.num_key_value_heads) for _ in range(cfgm.num_hidden_layers)),
    )


class FakeTokenizer:
    eos_token_id = -1

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [ord(c) % 97 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tensor_attrs(obj) -> list[torch.Tensor]:
    return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]


@pytest.mark.compat
def test_reported_bytes_are_the_tensors_held_and_smaller_than_dense():
    model = tiny("llama")
    config = TCAConfig(block_size=16, window=32)
    prompt = "abcdefghij" * 60  # 600 tokens
    with torch.no_grad(), enable(model, TCA(fake_budgets(model, config))) as s:
        cache = s.new_cache()
        ids = FakeTokenizer()(prompt, return_tensors="pt")["input_ids"]
        model(input_ids=ids, **cache_kwargs(cache))
        for t in range(40):
            model(input_ids=ids[:, t : t + 1], **cache_kwargs(cache))
    layers = cache.tca_layers()
    assert len(layers) == 2
    for layer in layers:
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensor_attrs(layer)}
        assert sum(held.values()) == layer.kv_bytes() + layer.index_bytes(), "hidden storage or missing tensor"
        assert layer.index_bytes() == 8 * (2 * 1 + 1 + 1 + 1 + 2), \
            "offsets, key_start, tail start, decode_keep of 1 row x 2 heads"
        # one allocation for the global part, one for the tail (allocator slack, see cache.py)
        ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
        assert ptr(layer.g_keys) == ptr(layer.g_values) == ptr(layer.g_pos) != ptr(layer.t_keys) == ptr(layer.t_values)
        assert layer.seen == 640 and layer.get_seq_length() == 640
        assert layer.t_fill < config.window + config.block_size
    assert cache.kv_bytes() < 0.35 * cache.dense_kv_bytes()
    assert 0 < cache.kept_fraction() < 0.3


@pytest.mark.compat
def test_streaming_keeps_sinks_and_window_only():
    model = tiny("qwen2")
    with torch.no_grad(), enable(model, StreamingLLM(sinks=4, window=32, block_size=16)) as s:
        cache = s.new_cache()
        model(input_ids=torch.randint(0, 97, (1, 300)), **cache_kwargs(cache))
        for _ in range(20):
            model(input_ids=torch.randint(0, 97, (1, 1)), **cache_kwargs(cache))
    for layer in cache.tca_layers():
        assert layer.g_pos.tolist() == [0, 1, 2, 3] * 2  # two KV heads, sinks only
        assert 32 <= layer.t_fill < 48


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*Tested families: Llama"):
        enable(model, StreamingLLM())
    assert model.config._attn_implementation != "tca"


def test_budgets_for_another_model_or_corrupt_are_refused(tmp_path):
    a, b = tiny("llama"), tiny("llama")
    with torch.no_grad():
        b.model.layers[0].self_attn.k_proj.weight.mul_(3.0)
    budgets = fake_budgets(a, TCAConfig(block_size=16, window=32))
    path = budgets.save(tmp_path / "b.json")
    Budgets.load(path, model=a)  # same model: fine
    with pytest.raises(BudgetError, match="another model"):
        Budgets.load(path, model=b)
    with pytest.raises(BudgetError, match="num_kv_heads|num_layers|model_type|hidden"):
        Budgets.load(path, model=tiny("gemma3"))
    path.write_text(path.read_text()[:200])
    with pytest.raises(BudgetError, match="corrupt"):
        Budgets.load(path)
    with pytest.raises(BudgetError, match="another model"):
        with enable(b, TCA(budgets)):
            pass
    assert b.config._attn_implementation == "sdpa", "a refused session must change nothing"


def test_budget_file_round_trip_and_reselection(tmp_path):
    model = tiny("llama")
    budgets = fake_budgets(model, TCAConfig(block_size=16, window=32))
    loaded = Budgets.load(budgets.save(tmp_path / "b.json"), model=model)
    assert loaded == budgets
    assert loaded.choice(0, 0) == 0
    assert loaded.at_tau(0.99).dense_heads == 4  # no candidate reaches 0.99 -> dense, reported
    with pytest.raises(ValueError):
        loaded.at(window=8)


def test_empty_prompt_and_bad_args():
    model = tiny("llama")
    with pytest.raises(ValueError, match="empty prompt"):
        run_prompt(model, FakeTokenizer(), "   ", None)
    with pytest.raises(ValueError):
        enable(model, StreamingLLM(), backend="cuda-magic")
    with pytest.raises(ValueError):
        StreamingLLM(window=0)


def test_prompt_beyond_trained_length_warns():
    model = tiny("llama")
    model.config.max_position_embeddings = 128
    with torch.no_grad(), enable(model, StreamingLLM(window=32, block_size=16)):
        with pytest.warns(UserWarning, match="beyond the model's trained length"):
            model(input_ids=torch.randint(0, 97, (1, 200)), use_cache=False)


def test_dense_cache_passed_to_tca_is_refused():
    from transformers.cache_utils import DynamicCache

    model = tiny("llama")
    with torch.no_grad(), enable(model, StreamingLLM(window=32, block_size=16)):
        with pytest.raises(TypeError, match="new_cache"):
            model(input_ids=torch.randint(0, 97, (1, 100)), **cache_kwargs(DynamicCache()))


def test_right_padding_is_refused():
    model = tiny("llama")
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, -5:] = 0
    with torch.no_grad(), enable(model, StreamingLLM(window=32, block_size=16)) as s:
        with pytest.raises(ValueError, match="left padding"):
            model(input_ids=torch.randint(0, 97, (2, 100)), attention_mask=mask, **cache_kwargs(s.new_cache()))


def test_layer_cannot_be_cropped_or_reordered():
    layer = RaggedLayer(16, 32)
    with pytest.raises(NotImplementedError):
        layer.crop(-1)
    with pytest.raises(NotImplementedError):
        layer.reorder_cache(torch.tensor([0]))


def test_a_forward_with_autograd_gets_a_clear_error():
    """The ragged cache gathers into preallocated storage; a forward with autograd on is refused
    with what to do, not with torch's message about out= arguments."""
    import tca_attention as tca
    from tiny_models import tiny

    model = tiny("llama")
    with tca.enable(model, tca.create("streaming:window=32,sinks=4,block_size=16")) as session:
        with pytest.raises(RuntimeError, match=r"torch.no_grad\(\)"):
            model(input_ids=torch.randint(0, 97, (1, 100)), use_cache=True,
                  **session.cache_kwargs(session.new_cache()))
        with torch.no_grad():  # the same call for inference runs
            model(input_ids=torch.randint(0, 97, (1, 100)), use_cache=True,
                  **session.cache_kwargs(session.new_cache()))


def test_a_cached_state_is_named_once_per_process(tmp_path, capsys):
    """announce(..., once=path): the first notice for a path goes to stderr, repeats only to the
    log (an eval creates its methods per batch); a silent call does not use up the notice."""
    from tca_attention.methods.state import announce

    path = tmp_path / "state.json"
    announce(False, "Using cached x", once=path)
    announce(True, "Using cached x", once=path)
    announce(True, "Using cached x", once=path)
    announce(True, "Using cached y", once=tmp_path / "other.json")
    announce(True, "Calibrating z")
    announce(True, "Calibrating z")
    assert capsys.readouterr().err.splitlines() == ["Using cached x", "Using cached y", "Calibrating z", "Calibrating z"]
