"""Host cost of one ``flash_kda.fwd`` call, on the CPU machine: the Python work around the
driver launch, with the device-only calls stubbed (every tensor reports cuda:0, the stream
and current-device queries return 0, the kernel is a fake whose driver call does nothing).

It splits the call into: the input checks (``fast_check``: the hot path; ``check_inputs``:
the detailed checker, now only run for inputs the fast path does not take), the parameter
packing and ``fwd``, for T16 H1 with A_log and dt_bias, without state and
with fp32 initial/final state (the BASELINES inputs), and a one-token decode step on a state
pool addressed by ``state_indices`` (the serving path). GPU-side numbers: host_cost.py.
Usage: python benchmarks/host_cost_cpu.py (in a process of its own: it patches torch)."""
from __future__ import annotations

import functools
import timeit

import torch

from common import make_inputs  # noqa: I100  (benchmarks/ is on sys.path when run as a script)

import flash_kda
from flash_kda import api, checks, jit
from flash_kda.jit.params import ParamBlock, pack
from flash_kda.jit.runtime import LoadedKernel
from flash_kda.jit.arch import REFERENCE_TARGET
from flash_kda.jit.spec import all_specs


def stub_device() -> None:
    """Make CPU tensors pass as cuda:0 and the device queries answer without a GPU.

    ``int`` and ``abs`` are C callables that do not bind as methods, so ``t.get_device()``
    is ``int() == 0`` at about the cost of the real C method."""
    torch.Tensor.get_device = int
    torch._C._cuda_getDevice = int
    torch._C._cuda_getCurrentRawStream = abs
    api._sm_count = functools.lru_cache(maxsize=None)(lambda index: 132)
    api.device_arch = functools.lru_cache(maxsize=None)(lambda index: REFERENCE_TARGET)
    from cuda.bindings import driver
    ok = (driver.CUresult.CUDA_SUCCESS,)
    for spec in all_specs((REFERENCE_TARGET,)):
        kernel = object.__new__(LoadedKernel)  # what LoadedKernel.__init__ sets, without a driver
        kernel.spec, kernel.device_index, kernel.function = spec, 0, driver.CUfunction(0)
        kernel.threads, kernel.smem_bytes = spec.threads, 100_000
        kernel._launch, kernel._success = (lambda *args: ok), driver.CUresult.CUDA_SUCCESS
        jit._loaded[(spec, 0)] = kernel


def per_call_us(fn, calls: int = 20000) -> float:
    """Best of 7 runs of ``calls`` calls, in µs per call."""
    for _ in range(200):
        fn()
    return min(timeit.repeat(fn, number=calls, repeat=7)) / calls * 1e6


def main() -> None:
    stub_device()
    inp = make_inputs(1, 16, 1, device="cpu", seed=1)
    out = torch.empty_like(inp["v"])
    h0 = torch.randn(1, 1, 128, 128)
    final = torch.empty_like(h0)
    rows = []
    pool = torch.zeros(4, 1, 128, 128)
    step = make_inputs(1, 1, 1, device="cpu", seed=2)
    step_out = torch.empty_like(step["v"])
    cases = (("no state", inp, out, (None, None), {}), ("fp32 initial/final state", inp, out, (h0, final), {}),
             ("decode T1, pool + state_indices", step, step_out, (pool, pool),
              {"state_indices": torch.tensor([2], dtype=torch.int32)}))
    for label, x, o, states, serving in cases:
        args = (x["q"], x["k"], x["v"], x["g"], x["beta"], 0.088, o, x["A_log"], x["dt_bias"], -5.0, *states, None)
        fast_args = (*args, tuple(serving.get(n) for n in ("state_indices", "has_initial_state", "num_accepted_tokens",
                                                            "checkpoint_offsets", "checkpoint_state")) if serving else None)
        assert checks.fast_check(*fast_args) is not None, "the stubbed inputs should take the fast path"
        block = ParamBlock()
        q, k, v, g, beta, scale, _, A_log, dt_bias, lower_bound, initial_state, final_state, _ = args

        def pack_params() -> None:  # the core parameters, as fwd packs them, data_ptr() calls included
            pack(block.params, 0, q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(), beta.data_ptr(),
                 o.data_ptr(), A_log.data_ptr() if A_log is not None else 0,
                 dt_bias.data_ptr() if dt_bias is not None else 0,
                 initial_state.data_ptr() if initial_state is not None else 0,
                 final_state.data_ptr() if final_state is not None else 0, 0, 16, 16, 1, 1, 0, scale, lower_bound, 0)

        rows.append((label, {
            "fast_check": per_call_us(lambda: checks.fast_check(*fast_args)),
            "check_inputs (detailed)": per_call_us(lambda: checks.check_inputs(*args, **serving)),
            "pack core params (data_ptr + pack_into)": per_call_us(pack_params),
            "fwd": per_call_us(lambda: flash_kda.fwd(*args, **serving)),
        }))
    print("host cost per call on this CPU, T16 H1, device calls stubbed (µs):")
    parts = list(rows[0][1])
    print("| part | " + " | ".join(label for label, _ in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for part in parts:
        print(f"| {part} | " + " | ".join(f"{numbers[part]:.2f}" for _, numbers in rows) + " |")


if __name__ == "__main__":
    main()
