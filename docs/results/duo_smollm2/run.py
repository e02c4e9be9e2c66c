"""Optimise DuoAttention's gates on the packaged SmolLM2 (CPU) and write a summary of the gates.

Run from the repository root: `python docs/results/duo_smollm2/run.py [steps] [length]` (defaults 12, 512). Writes
gates.json (the gate state: one number per KV head, no weights) and summary.json beside this file.
"""
import json
import sys
import time
from pathlib import Path

import torch

from tca_attention.integration.probe import ModelProbe
from tca_attention.methods import duo
from tca_attention.models import load_model

here = Path(__file__).parent
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 12
length = int(sys.argv[2]) if len(sys.argv) > 2 else 512
torch.manual_seed(0)
model, tok = load_model("smollm2")
model = model.float()
opt = duo.Optimisation(steps=steps, length=length, sinks=32, recent=128)  # scaled to the short CPU prompts
t0 = time.perf_counter()
gates = duo.optimise_gates(ModelProbe(model), duo.passkey_prompts(tok, opt), opt, progress=True)
gates.save(here / "gates.json")
summary = {"model": "smollm2 (SmolLM2-135M-Instruct, packaged GGUF, float32 on CPU)", "torch_threads": torch.get_num_threads(),
           "wall_seconds": round(time.perf_counter() - t0, 1), "optimisation": gates.calibration, **gates.summary(),
           "top_heads": sorted(((g, i, h) for i, row in enumerate(gates.layers) if row for h, g in enumerate(row)),
                               reverse=True)[:12]}
(here / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: v for k, v in summary.items() if k != "per_layer_mean"}, indent=1))
