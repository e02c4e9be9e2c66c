"""TCA's short-prompt policy: the measured crossover, its cache, and dense_below="auto"."""
from __future__ import annotations

import pytest
import torch
from test_batch_invariance import fake_identity, mixed_budgets

from tca_attention import registry
from tca_attention.methods.tca import crossover as X
from tca_attention.methods.tca.config import TCAConfig
from tca_attention.methods.tca.method import TCA


def rows(dense: list[float], tca: list[float]) -> list[dict[str, float]]:
    return [{"length": 1024 * 2**i, "dense_ms": d, "tca_ms": t} for i, (d, t) in enumerate(zip(dense, tca))]


def test_crossover_is_the_first_length_from_which_tca_always_wins():
    assert X.crossover_of(rows([1, 2, 4, 8], [3, 3, 3, 3])) == 4096
    assert X.crossover_of(rows([1, 2, 4, 8], [3, 1, 5, 3])) == 8192  # a later loss moves it up
    assert X.crossover_of(rows([1, 2, 4, 8], [0, 1, 2, 3])) == 1024
    assert X.crossover_of(rows([1, 2, 4, 8], [2, 3, 5, 9])) == X.NEVER


def tca(dense_below="auto") -> TCA:
    cfg = TCAConfig(block_size=16, window=32)
    return TCA(mixed_budgets(cfg, fake_identity(layers=2, kv=2, heads=4, head_dim=16)), dense_below=dense_below)


def test_measure_runs_both_paths_at_each_length():
    """The layer path really runs (selection, prefill, commit) for every length; timings come from the timer."""
    calls = []

    def timer(fn):
        out = fn()
        calls.append(out.shape)
        return float(len(calls))

    got = X.measure(tca(), heads=4, head_dim=16, dtype=torch.float32, device=torch.device("cpu"),
                    lengths=(64, 200), timer=timer)
    assert [r["length"] for r in got] == [64, 200]
    assert [(r["dense_ms"], r["tca_ms"]) for r in got] == [(1.0, 2.0), (3.0, 4.0)]
    assert calls == [(1, 4, 64, 16), (1, 64, 4, 16), (1, 4, 200, 16), (1, 200, 4, 16)]  # SDPA vs executor layouts


def test_auto_is_never_dense_on_the_cpu_and_ints_are_respected():
    q = torch.randn(1, 4, 300, 16)
    k = torch.randn(1, 2, 300, 16)
    ks = torch.zeros(1, dtype=torch.long)
    assert X.crossover(tca(), 4, 16, torch.float32, torch.device("cpu")) == 0
    assert tca("auto").plan(0, q, k, ks, 0.25, padded=False) is not None
    assert tca(301).plan(0, q, k, ks, 0.25, padded=False) is None  # shorter than dense_below: dense
    assert tca(300).plan(0, q, k, ks, 0.25, padded=False) is not None
    with pytest.raises(ValueError, match="dense_below"):
        tca("sometimes")
    with pytest.raises(ValueError, match="dense_below"):
        tca(-1)


def test_registry_spells_auto_and_lengths():
    b = tca().budgets
    assert registry.create("tca:dense_below=auto", budgets=b).dense_below == "auto"
    assert registry.create("tca:dense_below=4096", budgets=b).dense_below == 4096
    with pytest.raises(ValueError, match="dense_below"):
        registry.create("tca:dense_below=soon", budgets=b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_crossover_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    cfg = TCAConfig(block_size=64, window=256)
    m = TCA(mixed_budgets(cfg, fake_identity(layers=2, kv=8, heads=32, head_dim=128)))
    dev = torch.device("cuda")
    first = X.crossover(m, 32, 128, torch.bfloat16, dev)
    files = list((tmp_path / "crossover").glob("*.json"))
    assert len(files) == 1 and first > 0
    assert X.crossover(m, 32, 128, torch.bfloat16, dev) == first  # from the cache
