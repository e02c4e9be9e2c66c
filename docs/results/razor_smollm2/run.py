"""RazorAttention's echo / induction scores on the packaged SmolLM2 (CPU); writes scores.json (the
state: two numbers per KV head, no weights) and summary.json beside this file.
Run from the repository root: `python docs/results/razor_smollm2/run.py`."""
import json
import time
from pathlib import Path

from tca_attention.integration.probe import ModelProbe
from tca_attention.methods import razor
from tca_attention.models import load_model

here = Path(__file__).parent
model, _ = load_model("smollm2")
model = model.float()
t0 = time.perf_counter()
scores = razor.calibrate_razor_scores(ModelProbe(model), razor.Probing(), progress=True)
scores.save(here / "scores.json")
method = razor.Razor(scores)
heads = [(i, h) for i, row in enumerate(scores.echo) if row for h in range(len(row))]
top = lambda s: sorted(((round(s[i][h], 3), i, h) for i, h in heads), reverse=True)[:8]  # noqa: E731
summary = {"model": "smollm2 (SmolLM2-135M-Instruct, packaged GGUF, float32 on CPU)", "probe": scores.calibration,
           "wall_seconds": round(time.perf_counter() - t0, 1), "top_echo": top(scores.echo),
           "top_induction": top(scores.induction),
           "retrieval_heads_default": [(i, h) for i, h in heads if method.kinds(i)[h] == "dense"]}
(here / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
