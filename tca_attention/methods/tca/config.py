"""Frozen configuration of TCA-Attention (symbols follow docs/method.md)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Score = Literal["column_mean", "observation"]
MassNorm = Literal["sum", "max"]


@dataclass(frozen=True)
class TCAConfig:
    """Hyper-parameters of calibration and online selection.

    block_size (b): tokens per block, max tokens kept per block, decode compression period.
    window (w): most recent tokens always kept, and each query's causal window.
    tau: retained-attention threshold used by calibration.
    alpha: weight of the concentration term of the redundancy metric (Eq. 6).
    sigma: spread of the log-Gaussian over log2(k) of the candidate ladder.
    score: calibration score, "observation" (last b queries) or "column_mean" (paper reading).
    sink_tokens: first tokens always kept (off by default, StreamingLLM-style option).
    mass_norm: scale of the mass term of Eq. 6: "sum" (block mass, sums to 1 over blocks, the
        paper's reading) or "max" (block mass over the largest block mass, on the [0, 1] scale of
        the concentration term; see docs/method.md).
    """

    block_size: int = 128
    window: int = 4096
    tau: float = 0.9
    alpha: float = 0.0
    sigma: float = 1.0
    score: Score = "column_mean"
    sink_tokens: int = 0
    mass_norm: MassNorm = "sum"

    def __post_init__(self) -> None:
        b = self.block_size
        if b < 2 or b & (b - 1):
            raise ValueError(f"block_size must be a power of two >= 2, got {b}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.score not in ("column_mean", "observation"):
            raise ValueError(f"score must be 'column_mean' or 'observation', got {self.score!r}")
        if self.mass_norm not in ("sum", "max"):
            raise ValueError(f"mass_norm must be 'sum' or 'max', got {self.mass_norm!r}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")

    def with_(self, **changes) -> "TCAConfig":
        return replace(self, **changes)


# Named presets. The paper's b, w, tau and sigma are the defaults. alpha defaults to 0 and the
# score to column_mean because those keep retrieval at full-attention accuracy in our
# measurements, where the paper's alpha = 0.5 does not (docs/method.md, "Defaults, measured");
# PAPER_ALPHA restores alpha = 0.5. SMALL_CONTEXT suits models trained on 8K tokens, where
# w = 4096 would leave most prompts dense.
DEFAULT = TCAConfig()
PAPER_ALPHA = TCAConfig(alpha=0.5)
SMALL_CONTEXT = TCAConfig(window=512)
PRESETS: dict[str, TCAConfig] = {"default": DEFAULT, "paper-alpha": PAPER_ALPHA, "small-context": SMALL_CONTEXT}

# `auto` (the command line's default) picks a preset from the model's trained length: the paper's
# w = 4096 for long-context models (trained on >= 64K tokens), else w = 512.
AUTO = "auto"
AUTO_LONG_CONTEXT = 65536


def auto_preset(trained_length: int | None) -> tuple[str, str]:
    """(preset name, one-line reason) for a model trained on `trained_length` tokens (None: unknown)."""
    if trained_length is not None and trained_length >= AUTO_LONG_CONTEXT:
        return "default", (f"TCA preset 'default' (w={DEFAULT.window}, the paper's): the model was trained on "
                           f"{trained_length} tokens. Override with --preset/--window.")
    seen = (f"the model was trained on {trained_length} tokens" if trained_length is not None
            else "the model's config gives no trained length (max_position_embeddings)")
    return "small-context", (f"TCA preset 'small-context' (w={SMALL_CONTEXT.window}): {seen}; the paper's "
                             f"w={DEFAULT.window} suits 128K models. Override with --preset/--window.")
