"""Compatibility smoke test: plain transformers (and the adapter's tested range).

Marked `compat`: it runs in the default suite and in the compatibility stage (scripts/compat.sh),
which installs each transformers release of requirements/compat-versions.txt into its own venv
and sets TCA_EXPECT_TRANSFORMERS to that release, so the stage proves it runs the version it names.
"""
import os

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.compat


def test_transformers_is_the_release_named():
    """In the compat stage: the release it names. Otherwise: inside the declared range."""
    from packaging.version import Version

    from tca_attention.integration.adapter import TESTED

    expected = os.environ.get("TCA_EXPECT_TRANSFORMERS")
    if expected:
        assert transformers.__version__ == expected
    assert TESTED[0] <= Version(transformers.__version__) <= TESTED[1]


def test_tiny_llama_forward_and_generate():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 97, (2, 11))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 11, 97)
    assert torch.isfinite(logits).all()

    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 16)
    assert torch.equal(out[:, :11], ids)
    # Greedy decoding through the KV cache picks what one full forward over the whole sequence
    # ranks first (up to float noise): the cache plumbing of this release agrees with itself.
    with torch.no_grad():
        full = model(input_ids=out).logits[:, 10:-1]
    picked = full.gather(-1, out[:, 11:, None])[..., 0]
    assert torch.allclose(picked, full.max(-1).values, atol=1e-4)
