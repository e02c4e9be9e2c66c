"""InfiniRetri (Ye et al., "Infinite Retrieval: Attention Enhanced LLMs in Long-Context Processing",
2025): the model's own attention as retrieval over a long input read in chunks.

The context is read `chunk` tokens at a time. Each step runs one forward of
    prefix + retained sentences + the next chunk + suffix (the question and the answer opener)
and reads one layer's attention (the last; summed over heads) from the question's tokens to the
context part. Each question row is smoothed with a centred window of `phrase` tokens (phrase-level
rather than token-level scores), weighted by the square of how much that question token attends to
the question itself (measured on the first chunk, then kept), and summed over the rows. The `topk`
best-scored tokens select their whole sentences, which are retained (token ids, in order) for the
next step; after the last chunk, what is retained is the context the answer is generated from.

This is not a per-layer attention policy: it changes the tokens the model reads, so it runs above
the engine. `retain` drives a Probe's forwards and returns token ids; the caller generates from
`prefix + retained + suffix` with dense attention (the eval does, `eval/methods.py`). The registry's
`infiniretri` object is a Method only so that specs, `tca methods` and the eval name it; run as an
attention method in a session it refuses with a clear error (check_model). docs/methods.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from .base import Method, Probe

SENTENCE_ENDS = (".", "!", "?", "\u3002", "\uff01", "\uff1f")  # the official split: (\n\n)|([。！？.?!])


@dataclass(frozen=True)
class InfiniRetri(Method):
    """chunk: context tokens read per step (the official window_length, 1024); topk: tokens whose
    sentences are retained (300, the package's default); phrase: the smoothing window (its
    answer_length, 8); layer: which full-attention layer's attention ranks (-1: the last)."""

    chunk: int = 1024
    topk: int = 300
    phrase: int = 8
    layer: int = -1
    name: str = "infiniretri"
    block_size: ClassVar[int] = 1
    window: ClassVar[int] = 1
    reads_in_chunks: ClassVar[bool] = True  # the eval rewrites the prompt with `retain`, then runs dense

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.topk < 1 or self.phrase < 1:
            raise ValueError(f"InfiniRetri needs chunk, topk and phrase >= 1, got {self.chunk}, {self.topk}, "
                             f"{self.phrase}")

    def check_model(self, model) -> None:
        raise ValueError("infiniretri rewrites the prompt (it reads the context in chunks and keeps the sentences "
                         "the question attends to); it is not an attention method for a session: run it through "
                         "`tca eval` or tca_attention.methods.infiniretri.retain")

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> None:
        return None

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.ones(num_kv_heads, dtype=torch.long)


def locate(ids: Sequence[int], piece: Sequence[int], start: int = 0) -> tuple[int, int]:
    """[s, e) of `piece` (token ids of a text tokenized alone) inside `ids` at or after `start`.

    A text tokenized inside a prompt may differ from it alone in its first and last token (they can
    merge with their neighbours), so the inner tokens are searched and the ends added back where
    they match. Raises ValueError when the inner tokens are not there."""
    ids, piece = list(ids), list(piece)
    inner = piece[1:-1] if len(piece) > 2 else piece
    n = len(inner)
    for s in range(start, len(ids) - n + 1):
        if ids[s : s + n] == inner:
            e = s + n
            if len(piece) > 2:
                s -= int(s > start and ids[s - 1] == piece[0])
                e += int(e < len(ids) and ids[e] == piece[-1])
            return s, e
    raise ValueError("the text's tokens were not found in the prompt")


def sentence_ends(texts: Sequence[str]) -> list[bool]:
    """Whether each token (its decoded text) ends a sentence: it ends with . ! ? (or their CJK
    forms, spaces stripped) or holds a blank line."""
    return [t.rstrip(" ").endswith(SENTENCE_ENDS) or "\n\n" in t for t in texts]


def sentence_of(ends: Sequence[bool]) -> torch.Tensor:
    """(C,) int64 sentence index of each token; a sentence ends at a token marked True."""
    e = torch.as_tensor(list(ends), dtype=torch.long)
    return torch.nn.functional.pad(e.cumsum(0), (1, 0))[:-1]


def phrase_scores(attn: torch.Tensor, q_weight: torch.Tensor, phrase: int) -> torch.Tensor:
    """attn (Q, C) question -> context attention (heads summed), q_weight (Q,) -> (C,) scores:
    sum over rows of q_weight^2 x (row summed over a window of `phrase` tokens around each token:
    [c - phrase // 2, c + (phrase - 1) // 2], the official 'same' convolution with a ones kernel)."""
    Q, C = attn.shape
    right = (phrase - 1) // 2
    padded = torch.nn.functional.pad(attn.double(), (phrase - 1 - right, right))  # (Q, C + phrase - 1)
    smooth = padded.unfold(1, phrase, 1).sum(-1)  # (Q, C)
    return (q_weight.double()[:, None] ** 2 * smooth).sum(0)


def select(scores: torch.Tensor, sentences: torch.Tensor, topk: int) -> torch.Tensor:
    """(C,) bool: every token of each sentence holding one of the topk best-scored tokens (ties:
    the earlier token)."""
    C = scores.numel()
    order = torch.sort(-scores, stable=True).indices[: min(topk, C)]
    chosen = torch.zeros(int(sentences.max()) + 1 if C else 0, dtype=torch.bool)
    chosen[sentences[order]] = True
    return chosen[sentences]


def question_attention(q: torch.Tensor, k: torch.Tensor, scaling: float, rows: slice) -> torch.Tensor:
    """Causal softmax attention of the query rows `rows` over every key, summed over the query heads.
    q (H, L, D), k (KV, L, D) -> (R, L) float64."""
    H, L, D = q.shape
    g = H // k.shape[0]
    pos = torch.arange(L, device=q.device)[rows]
    logits = (q[:, rows].float() @ k.float().repeat_interleave(g, 0).transpose(1, 2)) * scaling  # (H, R, L)
    logits = logits.masked_fill(torch.arange(L, device=q.device)[None, None, :] > pos[None, :, None], float("-inf"))
    return torch.softmax(logits, -1).sum(0).double().cpu()


def retain(probe: Probe, config: InfiniRetri, prefix: Sequence[int], context: Sequence[int],
           ends: Sequence[bool], suffix: Sequence[int], question: tuple[int, int]) -> tuple[list[int], dict]:
    """Read `context` in chunks; -> (the retained context token ids, a report).

    prefix/suffix: the prompt's token ids before and after the context; question: [start, end) of
    the question's tokens inside suffix; ends: sentence_ends of the context tokens.
    """
    if len(ends) != len(context):
        raise ValueError(f"{len(ends)} sentence marks for {len(context)} context tokens")
    q0, q1 = question
    if not 0 <= q0 < q1 <= len(suffix):
        raise ValueError(f"question span {question} is not inside the suffix of {len(suffix)} tokens")
    device = next(probe.model.parameters()).device
    kept_ids: list[int] = []
    kept_ends: list[bool] = []
    q_weight: torch.Tensor | None = None
    steps = []
    for c0 in range(0, max(len(context), 1), config.chunk):
        ids = kept_ids + list(context[c0 : c0 + config.chunk])
        marks = kept_ends + list(ends[c0 : c0 + config.chunk])
        P, C = len(prefix), len(ids)
        rows = slice(P + C + q0, P + C + q1)
        seen: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # q, k of every full layer (references)

        def observe(idx, q, k, v, scaling):
            seen[idx] = (q[0], k[0], scaling)

        probe.observe(torch.tensor([list(prefix) + ids + list(suffix)], device=device), observe)
        attn = question_attention(*seen[sorted(seen)[config.layer]], rows)  # (Q, L) of the chosen full layer
        seen.clear()
        if q_weight is None:  # the question's attention to itself, from the first chunk on
            q_weight = attn[:, rows].sum(-1)
        if C == 0:
            break
        keep = select(phrase_scores(attn[:, P : P + C], q_weight, config.phrase), sentence_of(marks), config.topk)
        kept_ids = [t for t, k in zip(ids, keep.tolist()) if k]
        kept_ends = [m for m, k in zip(marks, keep.tolist()) if k]
        steps.append({"read": C, "retained": len(kept_ids)})
    return kept_ids, {"context_tokens": len(context), "retained_tokens": len(kept_ids), "steps": steps,
                      "kept_fraction": len(kept_ids) / max(len(context), 1)}
