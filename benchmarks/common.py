"""Shared by the benchmark and the accuracy table: FLA's Triton path and CUDA-event timing."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kda_inputs import fla_chunk_kda, make_inputs, rel_rms  # noqa: E402,F401


def time_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, CUDA events, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
