"""The one timing utility of the benchmarks: CUDA events, warm-up, L2 flush, median.

Each timed call is preceded by an L2 flush, so every call starts with a cold cache, as a layer of
a real model would. flush="write" zeroes a buffer larger than L2 (triton.testing.do_bench's way):
L2 is then full of dirty lines that the timed call must write back as it reads, about 50 MB on an
H100 (~17 us), which weighs on short memory-bound calls (decode). flush="read" reads the buffer
instead, leaving L2 full of clean lines, closer to a decode step that follows weight reads.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

_FLUSH: torch.Tensor | None = None


def _flush_buffer(device: torch.device) -> torch.Tensor:
    global _FLUSH
    if _FLUSH is None or _FLUSH.device != device:
        _FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)  # 256 MB > L2
    return _FLUSH


def bench_ms(
    fn: Callable[[], object],
    target_ms: float = 400.0,
    min_reps: int = 3,
    max_reps: int = 200,
    warmup: int = 2,
    flush: str = "write",
) -> dict[str, float]:
    """Time fn on the current CUDA device. -> {"median_ms", "min_ms", "reps"}.

    Warm-up calls first (compilation, autotuning, allocator), then reps calls, each timed alone
    with CUDA events; reps is chosen so the timed part lasts about target_ms.
    flush: "write", "read" or "none" (see the module docstring).
    """
    if flush not in ("write", "read", "none"):
        raise ValueError(f"flush must be 'write', 'read' or 'none', got {flush!r}")
    dev = torch.device("cuda", torch.cuda.current_device())
    buf = _flush_buffer(dev)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max_reps, max(min_reps, target_ms / first)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush == "write":
            buf.zero_()
        elif flush == "read":
            buf.sum()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": float(reps)}
