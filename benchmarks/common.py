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
    return time_interleaved({"fn": fn}, rounds=1, reps=reps, warmup=warmup)["fn"]


def time_interleaved(fns: dict, rounds: int = 10, reps: int = 10, warmup: int = 10) -> dict:
    """Median milliseconds of each of ``fns`` (name -> callable), timed in turn: ``rounds`` rounds of ``reps``
    runs each, so that clock and thermal drift during the measurement reach every one alike (a ratio of two
    back-to-back blocks of runs moved by up to 4% between runs on the H100; benchmarks/NOTES.md, round 9)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
    return {name: statistics.median(samples) for name, samples in times.items()}
