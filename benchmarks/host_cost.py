"""Where the host time of one ``flash_kda.fwd`` call goes (GPU machine), T16 H1.

Rows: the whole call (no state, fp32 initial/final state, varlen, a pool addressed by
state_indices for a T16 call and a one-token decode step), the input checks
(``fast_check``, the hot path; ``check_inputs``, the detailed checker), the call with the
driver launch stubbed out, the bare ``cuLaunchKernel`` of the same kernel in several argument
forms (CUfunction/CUstream objects or plain ints), and single torch calls to compare this
host's CPU with the CPU machine (benchmarks/host_cost_cpu.py).

Timing: batches of ``BATCH`` calls, synchronised between batches and timed without the sync,
so that the launch queue never fills (a full queue would time the GPU, not the host);
the median and the best batch are reported (the GPU host's timings are noisy: compare the
best column between runs, or alternate the versions you compare in one session; on the device
machines one process can run 1.5x slower than the next for the same code, so run it a few
times: BENCHMARK_H100.md, sixteenth session, call 7).
Usage: python benchmarks/host_cost.py
"""
from __future__ import annotations

import statistics
import time

import torch

from common import make_inputs  # noqa: I100  (benchmarks/ is on sys.path when run as a script)

import flash_kda
from flash_kda import api, checks

BATCH = 200
BATCHES = 30


def per_call_us(fn) -> tuple[float, float]:
    """Median and best over batches of the wall-clock µs per call of ``fn``."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(BATCHES):
        start = time.perf_counter()
        for _ in range(BATCH):
            fn()
        times.append((time.perf_counter() - start) / BATCH * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times), min(times)


def gpu_us(fn, calls: int = 200) -> float:
    """Device time per call (CUDA events around ``calls`` back-to-back calls)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def main() -> None:
    from cuda.bindings import driver

    inp = make_inputs(1, 16, 1, seed=1)
    out = torch.empty_like(inp["v"])
    h0 = torch.randn(1, 1, 128, 128, device="cuda")
    final = torch.empty_like(h0)
    cu = torch.tensor([0, 16], device="cuda", dtype=torch.int64)
    base = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.088, out, inp["A_log"], inp["dt_bias"], -5.0)
    cases = {"no state": base + (None, None, None), "fp32 states": base + (h0, final, None),
             "varlen, fp32 states": base + (h0, final, cu)}
    rows: list[tuple[str, tuple[float, float]]] = []
    # A second of calls first: the GPU's clocks ramp up from idle, and while its kernels run slower than
    # the host issues them the launch queue fills and the first row would time the GPU, not the host.
    start = time.perf_counter()
    while time.perf_counter() - start < 1.0:
        flash_kda.fwd(*cases["no state"])
    torch.cuda.synchronize()
    for label, args in cases.items():
        rows.append((f"whole fwd, {label}", per_call_us(lambda: flash_kda.fwd(*args))))
    try:  # the serving path: a pool addressed by state_indices (absent in versions before the serving path)
        pool = torch.zeros(4, 1, 128, 128, device="cuda")
        slots = torch.tensor([2], device="cuda", dtype=torch.int32)
        pooled = base + (pool, pool, None)
        flash_kda.fwd(*pooled, state_indices=slots)
        rows.append(("whole fwd, T16, fp32 pool + state_indices",
                     per_call_us(lambda: flash_kda.fwd(*pooled, state_indices=slots))))
        step = make_inputs(1, 1, 1, seed=3)
        step_args = (step["q"], step["k"], step["v"], step["g"], step["beta"], 0.088, torch.empty_like(step["v"]),
                     step["A_log"], step["dt_bias"], -5.0, pool, pool, None)
        rows.append(("whole fwd, decode T1, fp32 pool + state_indices",
                     per_call_us(lambda: flash_kda.fwd(*step_args, state_indices=slots))))
    except TypeError:
        pass
    args = cases["no state"]
    rows.append(("checks.fast_check (hot-path checks), no state", per_call_us(lambda: checks.fast_check(*args))))
    rows.append(("checks.fast_check, fp32 states",
                 per_call_us(lambda: checks.fast_check(*cases["fp32 states"]))))
    rows.append(("checks.check_inputs (detailed checker), no state",
                 per_call_us(lambda: checks.check_inputs(*args))))

    flash_kda.fwd(*args, v_block=128)
    # (device, state_in, state_out, varlen, v_block[, gate kind]): older commits' keys have no gate kind
    kernel, splits = next(v for key, v in api._launchers.items() if key[:5] == (0, "none", "none", False, 128))
    block = api._local.block  # filled by the call above
    stream = api._stream_handle(0)
    real_launch = type(kernel).launch
    type(kernel).launch = lambda self, *launch_args: None
    try:
        rows.append(("fwd with the launch stubbed, no state", per_call_us(lambda: flash_kda.fwd(*args, v_block=128))))
        rows.append(("fwd with the launch stubbed, fp32 states",
                     per_call_us(lambda: flash_kda.fwd(*cases["fp32 states"], v_block=128))))
    finally:
        type(kernel).launch = real_launch
    rows.append(("LoadedKernel.launch (wrapper + cuLaunchKernel)",
                 per_call_us(lambda: kernel.launch(splits, 1, 1, stream, block.address))))
    launch, fn, threads, smem, address = driver.cuLaunchKernel, kernel.function, kernel.threads, kernel.smem_bytes, \
        block.address
    fn_int, stream_int = int(fn), int(stream)
    for label, f, s in (("CUfunction, CUstream", fn, stream), ("CUfunction, int stream", fn, stream_int),
                        ("int function, CUstream", fn_int, stream), ("int function, int stream", fn_int, stream_int)):
        rows.append((f"bare cuLaunchKernel({label})",
                     per_call_us(lambda: launch(f, 1, 1, 1, threads, 1, 1, smem, s, address, 0))))
    q = inp["q"]
    for label, fn_ in (("torch.compiler.is_compiling()", torch.compiler.is_compiling),
                       ("torch._C._cuda_getCurrentRawStream(0)", lambda: torch._C._cuda_getCurrentRawStream(0)),
                       ("torch._C._cuda_getDevice()", torch._C._cuda_getDevice),
                       ("q.dtype", lambda: q.dtype), ("q.shape", lambda: q.shape),
                       ("q.get_device()", q.get_device), ("q.is_contiguous()", q.is_contiguous),
                       ("q.data_ptr()", q.data_ptr), ("empty lambda (loop overhead)", lambda: None)):
        rows.append((label, per_call_us(fn_)))
    kernel_us = gpu_us(lambda: kernel.launch(splits, 1, 1, stream, block.address))

    print(f"host cost per call, T16 H1, {BATCHES} batches of {BATCH} calls "
          f"({torch.cuda.get_device_name()}); kernel device time {kernel_us:.1f} µs per launch:")
    print("| part | median µs | best µs |\n|---|---:|---:|")
    for label, (median, best) in rows:
        print(f"| {label} | {median:.2f} | {best:.2f} |")


if __name__ == "__main__":
    main()
