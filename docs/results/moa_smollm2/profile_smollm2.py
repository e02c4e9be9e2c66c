"""Profile SmolLM2-135M-Instruct for MoA once (CPU) and write summary.json beside this script.

Run from the repository root: python docs/results/moa_smollm2/profile_smollm2.py
"""
from __future__ import annotations

import json
import platform
import time
from collections import Counter
from pathlib import Path

import torch

from tca_attention.integration.probe import ModelProbe
from tca_attention.methods import moa
from tca_attention.models import load_model

OUT = Path(__file__).with_name("summary.json")


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    t0 = time.perf_counter()
    profile = moa.load_or_calibrate(ModelProbe(model), tok, "smollm2")
    seconds = time.perf_counter() - t0
    heads = profile.heads()
    summary = {"model": profile.model.name or "smollm2", "calibration": profile.calibration,
               "wall_seconds_this_run": round(seconds, 1), "cpu": platform.processor() or platform.machine(),
               "torch_threads": torch.get_num_threads(), "kv_heads": len(heads), "lengths": list(profile.lengths),
               "far_influence_share": {}, "plans": {}}
    for i, n in enumerate(profile.lengths):  # share of each head's influence beyond a 256-token band
        summary["far_influence_share"][str(n)] = [
            [round(t[min(256 // profile.block, len(t) - 1)] / t[0], 4) if t[0] else 0.0 for t in row]
            for row in profile.tails[i] if row is not None]
    for density in (0.25, 0.5):
        t1 = time.perf_counter()
        m = moa.MoA(profile, density=density)
        rules = [r for row in m._rules if row is not None for r in row]
        spans = {n: [r.span(n, m.sinks + m.window) / n for r in rules] for n in (2048, 4096, 8192)}
        summary["plans"][str(density)] = {
            "search_seconds": round(time.perf_counter() - t1, 2), "report": m.report()["moa"],
            "rules": Counter(f"{r.alpha:g}+{r.beta:g}N" for r in rules).most_common(),
            "mean_kept": {str(n): round(sum(v) / len(v), 4) for n, v in spans.items()},
            "per_layer_kept_8192": [round(sum(r.span(8192, m.sinks + m.window) for r in row) / (len(row) * 8192), 3)
                                    for row in m._rules if row is not None],
        }
    OUT.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "far_influence_share"}, indent=1)[:3000])


if __name__ == "__main__":
    main()
