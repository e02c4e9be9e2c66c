"""The cases of tests/test_tensor_parallel.py, run the same way in one process (the reference) and on
every rank of a tensor-parallel run (tests/tp_worker.py): every method of the engine, with per-head
state made by hand so that each KV head (and query head) gets a different setting, on a left-padded
batch (prefill, teacher-forced decode, greedy generate) and on one unpadded prompt."""
from __future__ import annotations

from typing import Any

import torch

from method_checks import run_with_cache
from tca_attention import registry
from tca_attention.integration import enable
from tca_attention.integration.adapter import cache_kwargs
from tca_attention.methods.dense import Dense
from tca_attention.methods.flexprefill import FlexPrefill
from tca_attention.methods.full_budget import FullBudget
from tca_attention.methods.head_split import HeadScores, HeadSplit
from tca_attention.methods.minference import MInference, PatternState
from tca_attention.methods.quest import Quest
from tca_attention.methods.state import ModelIdentity
from tca_attention.methods.streaming import StreamingLLM
from tca_attention.methods.tca.budgets import Budgets, HeadBudget
from tca_attention.methods.tca.candidates import candidate_ladder
from tca_attention.methods.tca.config import TCAConfig
from tca_attention.methods.tca.method import TCA
from tca_attention.methods.xattention import XAttention

B, L, PADS, STEPS, NEW = 3, 97, (0, 7, 30), 4, 4
# TCA candidate per (layer, KV head): 0 the cheapest, None dense; every head differs from its neighbour
TCA_CHOICES = ((0, None), (3, 0))


def tca_budgets(model, choices=TCA_CHOICES, config: TCAConfig = TCAConfig(block_size=16, window=32)) -> Budgets:
    """Budgets choosing candidate choices[layer][head] (None: dense) of the ladder."""
    ladder = candidate_ladder(config.block_size)
    C = ladder.shape[0]
    layers = []
    for row in choices:
        heads = []
        for c in row:
            c = C if c is None else c
            sc = tuple(0.0 if i < c else 1.0 for i in range(C))  # the first candidate reaching tau is c
            heads.append(HeadBudget(sc, sc))
        layers.append(tuple(heads))
    return Budgets(ModelIdentity.of(model), config, tuple(tuple(r) for r in ladder.tolist()), tuple(layers))


def head_scores(model) -> HeadScores:
    """Retrieval heads at fraction 0.5 (2 of 4), ranked over the whole model: KV head 0 of both layers,
    both on rank 0 (ranking each rank's heads alone would give rank 1 one retrieval head)."""
    return HeadScores(ModelIdentity.of(model), ((0.9, 0.1), (0.8, 0.2)))


def patterns(model) -> PatternState:
    """A different MInference pattern on neighbouring query heads (6 per layer)."""
    rows = (("a-shape", "vertical-slash", "block-sparse", "vertical-slash", "a-shape", "block-sparse"),
            ("block-sparse", "a-shape", "vertical-slash", "vertical-slash", "block-sparse", "a-shape"))
    return PatternState(ModelIdentity.of(model), rows)


# methods whose plan combines the heads of a layer (Method.combines_heads): their sums over heads run
# over the ranks. SpAtten prunes heads too (3 of the 6 query heads at layer 1, ranked over both ranks;
# ranked per rank, 2 of each rank's 3 would stay); Token Sparse at a coverage where the
# flat attention of the random model gives another token count per rank alone (row 1); DHSA with
# 8 keys chosen by chunk similarity per query block (budget 2 blocks + 8).
COMBINING = {"spatten": "spatten:keep=0.5,window=16,block_size=16,heads=0.5",
             "token-sparse": "token-sparse:min_tokens=16,recent=8,coverage=0.7",
             "dhsa": "dhsa:budget=40,block_size=16,chunk_len=4,boundary_window=2,nms=2,dense_tail=8"}
NAMES = ("full", "full-budget", "tca", "head-split", "minference", "streaming", "quest", "xattention", "flexprefill",
         "blasst", "hip", "longheads", *COMBINING)
CALIBRATED = "tca-calibrated"  # TCA with budgets calibrated in one process and loaded from their file
# the tiny random model's attention is flat: at tau 0.9 every head is dense; at 0.7 the calibration
# picks (the richest sparse candidate, dense) in layer 0 and (dense, the same) in layer 1
CALIBRATED_TAU = 0.7
CALIBRATION = TCAConfig(block_size=16, window=32)


class CharTokenizer:
    """Characters as ids inside the tiny models' 97-token vocabulary (enough for a calibration)."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [ord(c) % 97 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i) + 97 * (int(i) < 32)) for i in ids)


def calibrate(model, path) -> Budgets:
    """Calibrate TCA on the model (in one process: calibration needs every head) and save the file."""
    from tca_attention.integration.probe import calibrate as tca_calibrate

    budgets = tca_calibrate(model, CharTokenizer(), CALIBRATION, length=192, progress=False)
    budgets.save(path)
    return budgets


def methods(model) -> dict[str, Any]:
    """Every method of the engine (NAMES), at settings that are sparse on the cases' prompts."""
    return {
        "full": Dense(),
        "full-budget": FullBudget(window=32, block_size=16),
        "tca": TCA(tca_budgets(model), dense_below=0),
        "head-split": HeadSplit(head_scores(model), retrieval_fraction=0.5, sinks=4, window=16, block_size=16),
        "minference": MInference(patterns(model), vertical=8, slash=16, last_q=8, block_size=16),
        "streaming": StreamingLLM(sinks=4, window=16, block_size=16),
        "quest": Quest(budget=32, page_size=16, skip_layers=0),
        "xattention": XAttention(threshold=0.5, stride=4, block_size=16),
        "flexprefill": FlexPrefill(gamma=0.5, tau=0.1, min_budget=16, block_size=16),
        "blasst": registry.create("blasst:threshold=0.3,block_size=16"),
        "hip": registry.create("hip:k=2,block_size=16,sliding_window=16"),
        "longheads": registry.create("longheads:chunks=3,chunk_size=16"),
        **{name: registry.create(spec, model=model) for name, spec in COMBINING.items()},
    }


def family_method() -> StreamingLLM:
    """The method of the family sweep (every tested architecture): stateless, its cache evicts."""
    return StreamingLLM(sinks=4, window=16, block_size=16)


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch (ids, mask) and the teacher-forced decode tokens."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(PADS):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask, torch.randint(1, 97, (B, STEPS), generator=gen)


def _local_bytes(cache) -> int:
    return cache.kv_bytes() if hasattr(cache, "kv_bytes") else sum(
        l.keys.nbytes + l.values.nbytes for l in cache.layers if getattr(l, "keys", None) is not None)


@torch.no_grad()
def run_case(model, name: str, method) -> dict[str, Any]:
    ids, mask, steps = inputs()
    with enable(model, method) as session:
        prefill, dec, cache = run_with_cache(model, ids, mask, steps, session)
        out = {"prefill": prefill[mask.bool()], "decode": dec, "report": session.prefill_report(),
               "cache": session.cache_report(cache), "local_kv_bytes": _local_bytes(cache)}
        out["generate"] = session.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                           pad_token_id=0)
        out["generate_cache"] = session.cache_report()
        alone = ids[:1]  # one unpadded prompt: the attention mask is None, the plans' unpadded path
        out["alone"] = session.generate(alone, attention_mask=torch.ones_like(alone), max_new_tokens=NEW,
                                        do_sample=False, pad_token_id=0)
        out["alone_report"] = session.prefill_report()
        out["method"] = session.method  # as this process runs it (a rank: its per-head state sliced)
        out["shard"] = None if session.shard is None else session.shard.describe()
    return out


@torch.no_grad()
def prefill_alone(model, method) -> torch.Tensor:
    """Prefill logits (every real position) with the method's sums over heads left to this process's
    heads (the session lends ONE_PROCESS): on a rank holding some of the heads, the negative control
    of the combining methods."""
    from tca_attention.methods.base import ONE_PROCESS

    ids, mask, _ = inputs()
    with enable(model, method) as session:
        session.heads = ONE_PROCESS
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(session.new_cache()))
    return out.logits[mask.bool()]


def run_all(model, budgets_file=None) -> dict[str, dict[str, Any]]:
    """Every case; with a budget file, TCA on those budgets too (CALIBRATED), checked against the model."""
    cases = methods(model)
    if budgets_file is not None:
        cases[CALIBRATED] = TCA(Budgets.load(budgets_file, model=model).at(tau=CALIBRATED_TAU), dense_below=0)
    return {n: run_case(model, n, m) for n, m in cases.items()}
