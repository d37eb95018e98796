"""Where the host time of one ``flash_kda.fwd`` call goes (GPU machine): the whole call, the
input checks alone, the call with the driver launch stubbed out, and the bare cuLaunchKernel
of the same kernel.  Usage: python benchmarks/host_cost.py"""
from __future__ import annotations

import time

import torch

import flash_kda
from flash_kda import api, checks

from common import make_inputs


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    inp = make_inputs(1, 16, 1, seed=1)
    out = torch.empty_like(inp["v"])
    args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.088, out, inp["A_log"], inp["dt_bias"], -5.0)
    full = per_call_us(lambda: flash_kda.fwd(*args))
    check = per_call_us(lambda: checks.check_inputs(*args, None, None, None))
    spec = api._spec("none", "none", False, 128, "sm_90a")
    kernel = api.get_kernel(spec, 0)
    flash_kda.fwd(*args, v_block=128)
    block = api._local.block  # filled by the call above
    stream = api._stream_handle(0)
    bare = per_call_us(lambda: kernel.launch(1, stream, block.address))
    real_launch = type(kernel).launch
    type(kernel).launch = lambda self, blocks, stream, address: None
    try:
        no_launch = per_call_us(lambda: flash_kda.fwd(*args, v_block=128))
    finally:
        type(kernel).launch = real_launch
    print(f"host cost per call, T16 H1, 2000 calls ({torch.cuda.get_device_name()}):")
    print(f"| part | µs |\n|---|---:|\n| whole fwd | {full:.1f} |\n| input checks | {check:.1f} |\n"
          f"| fwd with the launch stubbed | {no_launch:.1f} |\n| bare cuLaunchKernel (same kernel, params) | {bare:.1f} |")


if __name__ == "__main__":
    main()
