"""The method registry: one spec syntax, typed parameters, clear errors, `tca methods`."""
import pytest
import torch

from tca_attention.cli import main
from tca_attention.methods.tca.config import TCAConfig
from tca_attention import registry
from tca_attention.methods.dense import Dense
from tca_attention.methods.streaming import StreamingLLM
from tca_attention.methods.tca.method import TCA
from test_cache_and_errors import fake_budgets
from tiny_models import tiny


def test_spec_parsing_types_and_errors():
    assert registry.parse_spec("tca") == ("tca", {})
    assert registry.parse_spec(" tca:tau=0.7, score=observation ") == ("tca", {"tau": 0.7, "score": "observation"})
    assert registry.parse_spec("streaming:window=1024,sinks=8") == ("streaming", {"window": 1024, "sinks": 8})
    with pytest.raises(KeyError, match="unknown method 'xattn'.*tca methods"):
        registry.parse_spec("xattn")
    with pytest.raises(ValueError, match="unknown parameter 'windw'.*known: sinks, window, block_size"):
        registry.parse_spec("streaming:windw=3")
    with pytest.raises(ValueError, match="window='big' is not a valid int"):
        registry.parse_spec("streaming:window=big")
    with pytest.raises(ValueError, match="should be key=value"):
        registry.parse_spec("tca:0.7")
    with pytest.raises(ValueError, match="given twice"):
        registry.parse_spec("tca:tau=0.7,tau=0.8")


def test_specs_match_the_methods_fields():
    registry._check_params_match_fields()


def test_create_builds_each_method():
    assert registry.create("full") == Dense() and Dense().is_dense
    m = registry.create("streaming:window=64,block_size=16")
    assert isinstance(m, StreamingLLM) and (m.window, m.block_size, m.sinks) == (64, 16, 4)
    model = tiny("llama")
    budgets = fake_budgets(model, TCAConfig(block_size=16, window=32))
    t = registry.create("tca:tau=0.99", budgets=budgets)
    assert isinstance(t, TCA) and t.budgets.config.tau == 0.99
    with pytest.raises(ValueError, match="model= and tokenizer="):
        registry.create("tca")
    with pytest.raises(ValueError, match="both in the spec and as arguments"):
        registry.create("streaming:window=64", window=32)


def test_create_tca_calibrates_once_then_loads(tmp_path, monkeypatch):
    """tca with a model and tokenizer: calibration through the cache (tiny model, short text)."""
    from tca_attention.methods.tca import budget_cache as calibration_cache

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny("llama")
    calls = []
    real = calibration_cache.load_or_calibrate

    def spy(*a, **k):
        calls.append(a[3])
        return real(*a, **{**k, "length": 300})

    monkeypatch.setattr(calibration_cache, "load_or_calibrate", spy)

    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            return {"input_ids": torch.tensor([[ord(c) % 97 for c in text]])}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + int(i) % 26) for i in ids)

    m = registry.create("tca:window=64,tau=0.8,preset=small-context", model=model, tokenizer=Tok())
    assert isinstance(m, TCA) and calls[0].window == 64 and calls[0].tau == 0.8
    saved = list((tmp_path / "budgets").glob("*.json"))
    assert len(saved) == 1
    again = registry.create("tca:window=64,tau=0.8,preset=small-context", model=model, tokenizer=Tok())
    assert again.budgets == m.budgets and list((tmp_path / "budgets").glob("*.json")) == saved


def test_tca_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in registry.names():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "tau:float" in out


def test_written_form_sweeps_and_density():
    assert registry.normalize(" streaming:block_size=16, window=64 ,sinks=2") == "streaming:sinks=2,window=64,block_size=16"
    assert registry.normalize("tca:tau=0.70,dense_below=0") == "tca:tau=0.7,dense_below=0"
    assert registry.format_spec("full", {}) == "full"
    assert registry.expand("full") == ["full"] and registry.expand("tca:tau=0.9") == ["tca:tau=0.9"]
    assert registry.expand("streaming:window=64|128,sinks=4") == ["streaming:window=64,sinks=4",
                                                                  "streaming:window=128,sinks=4"]
    assert registry.density_param("streaming") == "window"
    spec = registry.at_density("streaming:block_size=16", 0.25, 4096)
    assert abs(registry.create(spec).kept_tokens(4096) - 1024) <= 8
    assert registry.at_density("streaming", 1.0, 300) == "streaming:window=172"  # the smallest dense window
    with pytest.raises(ValueError, match="tca declares no density knob"):
        registry.at_density("tca", 0.5, 4096)
    with pytest.raises(ValueError, match="window is set by the density match"):
        registry.at_density("streaming:window=64", 0.5, 4096)
    assert "density knob: window" in registry.describe()


def test_tca_with_budgets_refuses_calibration_params():
    budgets = fake_budgets(tiny("llama"), TCAConfig(block_size=16, window=32))
    with pytest.raises(ValueError, match="tca: alpha, window cannot change with budgets handed in"):
        registry.create("tca:window=64,alpha=0.5,tau=0.8", budgets=budgets)
    assert registry.create("tca:dense_below=128,score=observation", budgets=budgets).dense_below == 128


def test_default_configuration_and_the_papers_rule():
    """DEFAULT_METHOD is TCA with last_q=16 and span=7 (what the CLI, the eval and the examples run);
    the bare `tca` stays the paper's rule (one last query, no span), so a spec keeps its meaning."""
    import tca_attention
    from tca_attention.cli import build_parser
    from tca_attention.eval.methods import DEFAULT_METHODS

    assert tca_attention.DEFAULT_METHOD == registry.DEFAULT_METHOD == "tca:last_q=16,span=7"
    budgets = fake_budgets(tiny("llama"), TCAConfig(block_size=16, window=32))
    default = registry.create(registry.DEFAULT_METHOD, budgets=budgets)
    paper = registry.create(registry.PAPER_METHOD, budgets=budgets)
    assert (default.last_q, default.span) == (16, 7)
    assert (paper.last_q, paper.span, paper.gqa, paper.floor) == (1, 1, "shared", 0.0)
    assert default.budgets is paper.budgets  # the options change the selection, not the calibration
    for command in ("demo", "generate"):
        args = build_parser().parse_args([command] + (["--passkey", "64"] if command == "generate" else []))
        assert args.method == registry.DEFAULT_METHOD
    assert DEFAULT_METHODS[:3] == ("full", registry.DEFAULT_METHOD, registry.PAPER_METHOD)
