"""flash_kda vs FLA's Triton chunk_kda on the BASELINES cases, timed in the same process.

Prints a markdown table (ours ms, FLA ms, ratio, issue-3 target, pass/fail, floor/ours), the
V-slice sweep, the portable variant (FLASH_KDA_KERNEL=portable) beside the default and FLA, the
serving inputs, the gate table (the softplus gate and lower_bound = -8 beside the bounded gate, and
FLA's softplus path), the host cost per call and the first-call costs.
Usage: python benchmarks/bench_fwd.py [--no-fla] [--reps N] [--quick | --portable | --serving | --gates]
(--quick: the main table only, with plain calls, so that it can time an older flash_kda too;
--portable: the main table and the portable variant's; --serving: the main table and the serving
inputs', strided and checkpointed, which a flash_kda since the serving path can also time; --gates:
the main table and the gate table)."""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time

import torch

import flash_kda
from flash_kda import api
from flash_kda.jit.spec import V_BLOCKS

from common import fla_chunk_kda, make_inputs, time_interleaved, time_ms

HBM_BYTES_PER_S = 3.0e12  # measured H100 copy bandwidth (BASELINES.md)
SOFTPLUS_VS_BOUNDED = 1.10  # the softplus gate (and lower_bound -8): at most this much slower than lower_bound -5
PORTABLE_VS_FLA = 1.5  # the portable variant (a proxy for Ampere, where FLA is the alternative)
SOFTPLUS_VS_FLA = {"T8192 H96 fixed": 3.0, "T8192 H64 varlen6": 3.0, "T32768 H32 fixed": 2.5}
CASES = [  # name, B, T, H, sequence lengths (varlen) or None, target ratio vs FLA
    ("T8192 H96 fixed", 1, 8192, 96, None, 3.2),
    ("T8192 H96 varlen [1300,547,2048,963,271,3063]", 1, 8192, 96, [1300, 547, 2048, 963, 271, 3063], 3.1),
    ("T8192 H96 varlen 1024x8", 1, 8192, 96, [1024] * 8, 3.5),
    ("T8192 H64 fixed", 1, 8192, 64, None, 2.6),
    ("T8192 H64 varlen6", 1, 8192, 64, [1300, 547, 2048, 963, 271, 3063], 2.9),
    ("T8192 H64 varlen 1024x8", 1, 8192, 64, [1024] * 8, 3.5),
    ("T32768 H32 fixed", 1, 32768, 32, None, 2.3),
    ("B16 T512 H32", 16, 512, 32, None, 3.5),
]


def floor_ms(B: int, T: int, H: int, N: int) -> float:
    tokens = B * T * H
    bytes_ = tokens * 128 * 2 * 5 + tokens * 2 + 2 * N * H * 128 * 128 * 4
    return bytes_ / HBM_BYTES_PER_S * 1e3


def strided_like(inp: dict) -> dict:
    """The same values laid out as an engine hands them over: q, k, v slices of one fused [.., H, 3K]
    projection, g inside a wider buffer, beta head-major."""
    B, T, H, _ = inp["q"].shape
    qkv = torch.cat([inp["q"], inp["k"], inp["v"]], dim=-1)
    g_buffer = torch.zeros(B, T, H * 128 + 64, device="cuda", dtype=torch.bfloat16)
    g_buffer[..., :H * 128] = inp["g"].reshape(B, T, H * 128)
    return dict(inp, q=qkv[..., :128], k=qkv[..., 128:256], v=qkv[..., 256:],
                g=g_buffer[..., :H * 128].view(B, T, H, 128), beta=inp["beta"].transpose(1, 2).contiguous().transpose(1, 2))


def checkpoints_for(lengths: list[int], device="cuda") -> torch.Tensor:
    """Two checkpoints per sequence, at about a third and two thirds of it (multiples of 16)."""
    return torch.tensor([[n // 3 // 16 * 16, 2 * n // 3 // 16 * 16] for n in lengths], device=device)


@contextlib.contextmanager
def kernel_variant(name: str):
    """Calls inside run the chunked kernel's ``name`` variant (as FLASH_KDA_KERNEL would select it)."""
    previous = os.environ.get("FLASH_KDA_KERNEL")
    os.environ["FLASH_KDA_KERNEL"] = name
    api.reset_variant()
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FLASH_KDA_KERNEL"]
        else:
            os.environ["FLASH_KDA_KERNEL"] = previous
        api.reset_variant()


PARTS = ("portable", "sweep", "serving", "gates")  # the tables beyond the main one


def bench_case(B, T, H, lens, with_fla: bool, reps: int, parts: tuple[str, ...] = PARTS):
    inp = make_inputs(B, T, H, seed=0)
    inp["A_log"] = torch.rand(H, device="cuda")
    inp["dt_bias"] = torch.rand(H, 128, device="cuda")
    cu = None
    if lens is not None:
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int64)
    N = len(lens) if lens is not None else B
    h0 = torch.randn(N, H, 128, 128, device="cuda")
    final = torch.empty_like(h0)
    out = torch.empty_like(inp["v"])
    scale = 128 ** -0.5
    offsets = checkpoints_for(lens if lens is not None else [T] * B)
    ckpt = torch.empty(N, 2, H, 128, 128, device="cuda")

    def ours(vb=None, x=inp, lower_bound=-5.0, **serving):
        return lambda: flash_kda.fwd(x["q"], x["k"], x["v"], x["g"], x["beta"], scale, out,
                                     x["A_log"], x["dt_bias"], lower_bound, initial_state=h0, final_state=final,
                                     cu_seqlens=cu, v_block=vb, **serving)

    default = time_ms(ours(), reps=reps)
    portable = {}
    if "portable" in parts:
        with kernel_variant("portable"):
            portable = {vb: time_ms(ours(vb), reps=reps) for vb in (None, *V_BLOCKS)}
    sweep = {vb: time_ms(ours(vb), reps=reps) for vb in V_BLOCKS} if "sweep" in parts else {}
    strided = checkpointed = float("nan")
    if "serving" in parts:
        strided = time_ms(ours(x=strided_like(inp)), reps=reps)
        checkpointed = time_ms(ours(checkpoint_offsets=offsets, checkpoint_state=ckpt), reps=reps)
    def fla_call(lower_bound):
        return lambda: fla_chunk_kda(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], scale, inp["A_log"],
                                     inp["dt_bias"], lower_bound, initial_state=h0, cu_seqlens=cu)

    fla = time_ms(fla_call(-5.0), reps=reps) if with_fla else None
    gates = {}
    if "gates" in parts:  # ours with the softplus gate and lower_bound -8 against -5, interleaved; FLA's softplus path
        gates = time_interleaved({"lb-5": ours(), "softplus": ours(lower_bound=None), "lb-8": ours(lower_bound=-8.0)},
                                 reps=max(1, reps // 5))
        gates["fla softplus"] = time_ms(fla_call(None), reps=reps) if with_fla else None
    return default, sweep, fla, floor_ms(B, T, H, N), strided, checkpointed, gates, portable


def host_cost_us(calls: int = 2000) -> float:
    inp = make_inputs(1, 16, 1, seed=1)
    out = torch.empty_like(inp["v"])
    args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.088, out, inp["A_log"], inp["dt_bias"], -5.0)
    for _ in range(50):
        flash_kda.fwd(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        flash_kda.fwd(*args)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


FIRST_CALL = r"""
import time, torch
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
import sys; sys.path.insert(0, "tests")
from kda_inputs import make_inputs
inp = make_inputs(1, 64, 2, seed=2); out = torch.empty_like(inp["v"])
t0 = time.perf_counter()
import flash_kda
flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.088, out, inp["A_log"], inp["dt_bias"], -5.0)
torch.cuda.synchronize()
print(f"{(time.perf_counter() - t0) * 1e3:.1f}")
"""


def first_call_ms(cache_dir: str) -> float:
    env = dict(os.environ, FLASH_KDA_CACHE_DIR=cache_dir)
    res = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="the main table only (plain calls)")
    parser.add_argument("--portable", action="store_true", help="the main table and the portable variant's")
    parser.add_argument("--serving", action="store_true", help="the main table and the serving inputs' (strided, "
                        "checkpoints)")
    parser.add_argument("--gates", action="store_true", help="the main table and the gates' (softplus, lower_bound "
                        "-8; FLA's softplus path unless --no-fla)")
    args = parser.parse_args()
    parts = (() if args.quick else ("portable",) if args.portable else ("serving",) if args.serving
             else ("gates",) if args.gates else PARTS)
    with_fla = not args.no_fla
    props = torch.cuda.get_device_properties(0)
    print(f"card: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"flash_kda {flash_kda.__version__}, commit {os.environ.get('FLASH_KDA_COMMIT', 'unknown')}")
    rows, sweeps, serving, gates, portables = [], [], [], [], []
    for name, B, T, H, lens, target in CASES:
        ours, sweep, fla, floor, strided, checkpointed, gate_times, portable = bench_case(
            B, T, H, lens, with_fla, args.reps, parts)
        rows.append((name, ours, fla, target, floor))
        sweeps.append((name, sweep))
        serving.append((name, ours, strided, checkpointed))
        gates.append((name, ours, gate_times))
        portables.append((name, ours, fla, portable))
        print(f"  {name}: ours {ours:.3f} ms, FLA {fla if fla is None else round(fla, 3)} ms", flush=True)

    print("\n| case | ours ms | FLA ms | FLA/ours | target | pass | floor/ours |")
    print("|---|---:|---:|---:|---:|:---:|---:|")
    for name, ours, fla, target, floor in rows:
        ratio = fla / ours if fla else float("nan")
        verdict = ("pass" if ratio >= target else "fail") if fla else "—"
        print(f"| {name} | {ours:.3f} | {fla:.3f} | {ratio:.2f}× | ≥ {target}× | {verdict} | {floor / ours:.2f} |"
              if fla else f"| {name} | {ours:.3f} | — | — | ≥ {target}× | — | {floor / ours:.2f} |")
    if "portable" in parts:
        print_portable(portables)
    if "sweep" in parts:
        print_sweep(sweeps)
    if "serving" in parts:
        print_serving(serving)
    if "gates" in parts:
        print_gates(gates)
    if parts == PARTS:
        host = host_cost_us()
        print(f"\nhost cost per fwd call (T16 H1, 2000 calls, wall clock): {host:.1f} µs (target ≤ 15 µs)")
        with tempfile.TemporaryDirectory() as cold:
            cold_ms = first_call_ms(cold)
            warm_ms = first_call_ms(cold)
        print(f"first call in a fresh process: empty cache (compile) {cold_ms:.0f} ms, warm disk cache (load) "
              f"{warm_ms:.0f} ms")


def print_portable(portables) -> None:
    print(f"\nThe portable variant (FLASH_KDA_KERNEL=portable: no clusters; ms) beside the default and FLA, same "
          f"process; target ≥ {PORTABLE_VS_FLA}× faster than FLA. Its own V-slice sweep on the right:\n")
    print("| case | default | portable | portable/default | FLA | FLA/portable | pass | "
          + " | ".join(f"portable {vb}" for vb in V_BLOCKS) + " |")
    print("|---|---:|---:|---:|---:|---:|:---:|" + "---:|" * len(V_BLOCKS))
    for name, ours, fla, portable in portables:
        ratio = fla / portable[None] if fla else float("nan")
        verdict = ("pass" if ratio >= PORTABLE_VS_FLA else "fail") if fla else "—"
        print(f"| {name} | {ours:.3f} | {portable[None]:.3f} | {portable[None] / ours:.3f} | "
              f"{f'{fla:.3f}' if fla else '—'} | {ratio:.2f}× | {verdict} | "
              + " | ".join(f"{portable[vb]:.3f}" for vb in V_BLOCKS) + " |")


def print_sweep(sweeps) -> None:
    print("\nV-slice sweep (ours, ms per call, by CTA V width):\n")
    print("| case | " + " | ".join(f"v_block {vb}" for vb in V_BLOCKS) + " |")
    print("|---|" + "---:|" * len(V_BLOCKS))
    for name, sweep in sweeps:
        print(f"| {name} | " + " | ".join(f"{sweep[vb]:.3f}" for vb in V_BLOCKS) + " |")


def print_serving(serving) -> None:
    print("\nServing inputs on the same rows (ms): strided q/k/v/g/beta (slices of a fused projection, no copies;"
          " target ≤ 1.05× contiguous) and two checkpoints per sequence (target ≤ 1.03× without):\n")
    print("| case | contiguous | strided | strided/contiguous | 2 checkpoints | checkpoints/none |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ours, strided, checkpointed in serving:
        print(f"| {name} | {ours:.3f} | {strided:.3f} | {strided / ours:.3f} | {checkpointed:.3f} | "
              f"{checkpointed / ours:.3f} |")


def print_gates(gates) -> None:
    print(f"\nGates on the same rows (ms): the softplus gate (lower_bound=None) and lower_bound = -8 (the centred "
          f"chunk form) against lower_bound = -5 (target ≤ {SOFTPLUS_VS_BOUNDED}×), the three timed in turn (10 rounds "
          "of a fifth of --reps runs each), and FLA chunk_kda with the softplus gate (safe_gate=False, "
          "lower_bound=None):\n")
    print("| case | lb -5 | softplus | softplus/lb -5 | lb -8 | lb -8/lb -5 | FLA softplus | FLA/ours softplus | target |"
          " pass |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|:---:|")
    for name, _, g in gates:
        ours = g["lb-5"]  # timed interleaved with the other two gates, not the main table's block of runs
        fla_sp = g["fla softplus"]
        ratio = f"{fla_sp / g['softplus']:.2f}×" if fla_sp else "—"
        wants = [f"softplus ≤ {SOFTPLUS_VS_BOUNDED}× lb -5"]
        ok = g["softplus"] / ours <= SOFTPLUS_VS_BOUNDED
        if name in SOFTPLUS_VS_FLA:
            wants.append(f"≥ {SOFTPLUS_VS_FLA[name]}× FLA")
            ok = ok and fla_sp is not None and fla_sp / g["softplus"] >= SOFTPLUS_VS_FLA[name]
        if name == "T8192 H96 fixed":
            wants.append(f"lb -8 ≤ {SOFTPLUS_VS_BOUNDED}× lb -5")
            ok = ok and g["lb-8"] / ours <= SOFTPLUS_VS_BOUNDED
        print(f"| {name} | {ours:.3f} | {g['softplus']:.3f} | {g['softplus'] / ours:.3f} | {g['lb-8']:.3f} | "
              f"{g['lb-8'] / ours:.3f} | {f'{fla_sp:.3f}' if fla_sp else '—'} | {ratio} | {'; '.join(wants)} | "
              f"{'pass' if ok else 'fail'} |")


if __name__ == "__main__":
    main()
