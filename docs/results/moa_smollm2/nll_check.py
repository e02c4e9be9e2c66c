"""A sanity check of the SmolLM2 profile (CPU): next-token NLL of the last 512 tokens of two
3072-token essay windows (the same corpus as the profile, other random windows: a check, not an
eval), full attention vs MoA vs StreamingLLM at MoA's kept fraction. Writes nll_check.json here."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tca_attention import registry
from tca_attention.data.corpus import essay_text
from tca_attention.integration import enable
from tca_attention.integration.adapter import cache_kwargs
from tca_attention.integration.probe import ModelProbe
from tca_attention.methods import moa
from tca_attention.models import load_model

L, TAIL, WINDOWS = 3072, 512, 2


def nll(model, ids, method):
    with torch.no_grad():
        if method is None:
            logits = model(ids, logits_to_keep=TAIL + 1).logits
            kept = 1.0
        else:
            with enable(model, method) as s:
                logits = model(ids, logits_to_keep=TAIL + 1, **cache_kwargs(s.new_cache())).logits
                kept = s.prefill_report()["kept_fraction"]
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, -TAIL:])), kept


def main() -> None:
    model, tok = load_model("smollm2")
    profile = moa.load_or_calibrate(ModelProbe(model), tok, "smollm2")
    all_ids = tok(essay_text(), add_special_tokens=False)["input_ids"]
    rng = random.Random(123)
    out = {"length": L, "tail": TAIL, "windows": WINDOWS, "rows": []}
    for w in range(WINDOWS):
        s = rng.randint(0, len(all_ids) - L)
        ids = torch.tensor([all_ids[s : s + L]])
        row = {"start": s, "full": nll(model, ids, None)[0]}
        for density in (0.25, 0.5):
            m = moa.MoA(profile, density=density)
            row[f"moa:density={density}"], kept = nll(model, ids, m)
            spec = registry.at_density("streaming:sinks=64,block_size=64", kept, L)
            row[spec] = nll(model, ids, registry.create(spec))[0]
            row[f"kept@{density}"] = kept
        out["rows"].append(row)
        print(row, flush=True)
    Path(__file__).with_name("nll_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
