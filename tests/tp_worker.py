"""One rank of the tensor-parallel test (tests/test_tensor_parallel.py), launched by torchrun:

    torchrun --nproc_per_node 2 tests/tp_worker.py MODEL_DIR WHOLE_DIR BAD_DIR OUT_DIR BUDGETS FAMILIES_DIR

Loads MODEL_DIR with transformers' tensor parallelism (tp_plan="auto", gloo on the CPU), runs the
cases of tp_cases.py (TCA also on the BUDGETS file, calibrated in one process) and saves what it saw
to OUT_DIR/rank<r>.pt (with the methods combining the heads also run on the rank's heads alone, the
negative control); runs TCA on WHOLE_DIR (a model
whose tp_plan gathers the projections' outputs: every rank sees every head); then tries BAD_DIR (KV
heads that do not divide by the world size) and saves the error enable() raised; and runs the family
sweep's method on every model folder in FAMILIES_DIR (one per tested architecture).
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

sys.path.insert(0, str(Path(__file__).parent))
import tp_cases  # noqa: E402

from tca_attention import registry  # noqa: E402
from tca_attention.integration import enable  # noqa: E402
from tca_attention.integration.adapter import LOAD_KWARGS  # noqa: E402


def load(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                 dtype=torch.float64, **LOAD_KWARGS)
    return model.eval()


def main() -> None:
    model_dir, whole_dir, bad_dir, out_dir, budgets, families = sys.argv[1:]
    model = load(model_dir)
    rank = dist.get_rank()
    out = {"cases": tp_cases.run_all(model, budgets)}
    whole = load(whole_dir)
    out["whole"] = tp_cases.run_case(whole, "tca", tp_cases.methods(whole)["tca"])
    out["families"] = {d.name: tp_cases.run_case(load(str(d)), d.name, tp_cases.family_method())
                       for d in sorted(Path(families).iterdir())}
    # the negative control: the combining methods with their sums over this rank's heads alone
    out["alone"] = {name: tp_cases.prefill_alone(model, registry.create(spec, model=model))
                    for name, spec in tp_cases.COMBINING.items()}
    try:
        with enable(load(bad_dir), None):
            out["bad"] = None
    except Exception as e:  # the error under test: its type and message
        out["bad"] = (type(e).__name__, str(e))
        if not isinstance(e, ValueError):
            out["bad_traceback"] = traceback.format_exc()
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
