"""The serving path: decode, speculative verify and chunked prefill on a state pool, against FLA's
``fused_recurrent_kda_fwd`` (pool in place) and the state-traffic floor, timed in the same process.

Times are ``triton.testing.do_bench`` medians (the L2 is flushed before every replay). Decode and verify
steps are timed as CUDA-graph replays, ours and FLA's alike, which is how engines run them, in two ways:
- one call per graph: every replay pays the graph launch and the write-back of the flush's dirty L2
  (about 5 µs together: an empty replay measures that much), a fixed cost of the harness;
- a step of LAYERS layers per graph (each layer its own pool and inputs, the same slots, as an engine's
  decode step walks its KDA layers), flushed once per replay, reported per layer: what a layer costs
  inside an engine's captured step.
Eagerly, FLA's host cost (Python and a Triton launch) can exceed the flush kernel and be timed instead of
its kernel. Chunked prefill is timed eagerly; the flush hides our host cost, as in BASELINES.md. The
floor is the state bytes a step must move (each addressed state read once and written once, or written
once per token when verify stores every token's state) over the device-to-device copy bandwidth
measured here.
Usage: python benchmarks/bench_decode.py [--no-fla] [--no-softplus] [--sweep] [--band] [--layers L]
--no-softplus: skip the softplus-gate rows (for commits before the softplus gate).
--sweep: also time one-token steps and verify with every CTAs-per-head choice (the rule in
flash_kda.api._decode_ctas_per_head picks one of them; this checks it).
--band: only fp32 one-token steps at 2, 4 and 8 CTAs per head over the pair counts around one wave of
the streamed build, at H = 16, 32 and 64, per layer of a step graph (the band where the rule picks 2).
--layers: layers per step graph (default 8; 0 skips the step-graph columns)."""
from __future__ import annotations

import argparse
import inspect
import os

import torch
from triton.testing import do_bench

import flash_kda

from common import make_inputs

H, VK = 32, 128 * 128
TARGET_VS_FLA = 1.2     # decode at small N: at least this much faster than FLA
TARGET_VS_FLOOR = 1.1   # large N decode and verify: within this factor of the floor
TARGET_SOFTPLUS = 1.05  # decode with the softplus gate: within this factor of the bounded gate


def bench(fn, graph: bool = False) -> float:
    fn()  # compiles and autotunes (FLA's Triton kernels, our JIT) outside the timed calls
    torch.cuda.synchronize()
    if graph:
        step = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step):
            fn()
        fn = step.replay
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_step(calls: list) -> float:
    """Milliseconds per call of one CUDA graph holding ``calls`` in order (an engine's step over its
    layers), flushed once per replay."""
    def step():
        for call in calls:
            call()
    return bench(step, graph=True) / len(calls)


def copy_bandwidth() -> float:
    """Bytes per ms of a large device-to-device copy (read + write)."""
    src = torch.empty(256 * 2**20, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / bench(lambda: dst.copy_(src))


def fla_fused_recurrent():
    try:
        from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd
    except ImportError:
        return None
    accepted = set(inspect.signature(fused_recurrent_kda_fwd).parameters)

    def call(inp, pool, cu, indices, num_accepted=None):
        kw = dict(q=inp["q"], k=inp["k"], v=inp["v"], g=inp["g"], beta=inp["beta"], A_log=inp["A_log"],
                  dt_bias=inp["dt_bias"], initial_state=pool, scale=128 ** -0.5, output_final_state=True,
                  inplace_final_state=True, state_v_first=True, cu_seqlens=cu, ssm_state_indices=indices,
                  num_accepted_tokens=num_accepted, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                  use_beta_sigmoid_in_kernel=True, lower_bound=-5.0)
        return fused_recurrent_kda_fwd(**{k: v for k, v in kw.items() if k in accepted})

    return call


def pool_of(slots: int, dtype, heads: int = H) -> torch.Tensor:
    return (torch.randn(slots, heads, 128, 128, device="cuda") * 0.1).to(dtype)


def decode_case(N: int, dtype, fla, bandwidth: float, lower_bound: float | None = -5.0, layers: int = 1,
                heads: int = H) -> tuple:
    """(ours, FLA or None, floor) in ms per call: one call per graph when ``layers`` is 1, else per
    layer of a step graph (bench_step)."""
    slots = max(512, 2 * N)
    cu = torch.arange(N + 1, device="cuda", dtype=torch.int32)
    ours, theirs = [], []
    for layer in range(layers):
        inp = make_inputs(1, N, heads, seed=N + 1000 * layer)
        if layer == 0:
            indices = torch.randperm(slots, device="cuda")[:N].to(torch.int32)
        pool = pool_of(slots, dtype, heads)
        out = torch.empty_like(inp["v"])
        ours.append(lambda inp=inp, pool=pool, out=out: flash_kda.fwd(
            inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 128 ** -0.5, out, inp["A_log"], inp["dt_bias"],
            lower_bound, initial_state=pool, final_state=pool, cu_seqlens=cu, state_indices=indices, max_seqlen=1))
        theirs.append(lambda inp=inp, pool=pool: fla(inp, pool, cu, indices))
    t_ours = bench_step(ours)
    t_fla = bench_step(theirs) if fla else None
    floor = 2 * N * heads * VK * pool.element_size() / bandwidth
    return t_ours, t_fla, floor


def verify_case(N: int, T: int, dtype, fla, bandwidth: float, layers: int = 1) -> tuple:
    slots = max(512, 2 * N * T)
    cu = torch.arange(0, N * T + 1, T, device="cuda", dtype=torch.int32)
    ours, theirs = [], []
    for layer in range(layers):
        inp = make_inputs(1, N * T, H, seed=7 + 1000 * layer)
        if layer == 0:
            indices = torch.randperm(slots, device="cuda")[:N * T].view(N, T).to(torch.int32)
            accepted = torch.randint(1, T + 1, (N,), device="cuda", dtype=torch.int32)
        pool = pool_of(slots, dtype)
        out = torch.empty_like(inp["v"])
        ours.append(lambda inp=inp, pool=pool, out=out: flash_kda.fwd(
            inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 128 ** -0.5, out, inp["A_log"], inp["dt_bias"], -5.0,
            initial_state=pool, final_state=pool, cu_seqlens=cu, state_indices=indices, num_accepted_tokens=accepted,
            max_seqlen=T))
        theirs.append(lambda inp=inp, pool=pool: fla(inp, pool, cu, indices, accepted))
    t_ours = bench_step(ours)
    t_fla = bench_step(theirs) if fla else None
    floor = (1 + T) * N * H * VK * pool.element_size() / bandwidth
    return t_ours, t_fla, floor


def chunked_prefill_case(N: int, T: int) -> tuple:
    """Chunked prefill from a pool vs the same call on dense states (same kernel): the pool's cost."""
    inp = make_inputs(1, N * T, H, seed=8)
    cu = torch.arange(0, N * T + 1, T, device="cuda", dtype=torch.int32)
    pool = pool_of(512, torch.float32)
    indices = torch.randperm(512, device="cuda")[:N].to(torch.int32)
    dense = pool[indices.long()].clone()
    out = torch.empty_like(inp["v"])
    base = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 128 ** -0.5, out, inp["A_log"], inp["dt_bias"], -5.0)
    t_pool = bench(lambda: flash_kda.fwd(*base, initial_state=pool, final_state=pool, cu_seqlens=cu,
                                         state_indices=indices, max_seqlen=T))
    t_dense = bench(lambda: flash_kda.fwd(*base, initial_state=dense, final_state=dense, cu_seqlens=cu, max_seqlen=T))
    return t_pool, t_dense


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--no-softplus", action="store_true")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--band", action="store_true")
    args = parser.parse_args()
    if args.band:
        band(copy_bandwidth(), max(args.layers, 1))
        return
    fla = None if args.no_fla else fla_fused_recurrent()
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    print(f"card: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, flash_kda "
          f"{flash_kda.__version__}, commit {os.environ.get('FLASH_KDA_COMMIT', 'unknown')}; FLA fused_recurrent "
          f"{'timed' if fla else 'not available'}; copy bandwidth {bandwidth / 1e9:.2f} TB/s (read + write)")
    print(f"\nH = {H}, K = V = 128, pool of max(512, 2N) slots, random slots, bounded gate; "
          "do_bench medians in ms; floor = state bytes / copy bandwidth")
    for layers in (1, args.layers) if args.layers > 1 else (1,):
        if layers == 1:
            print("\nOne call per CUDA graph replay (L2 flushed before each):\n")
        else:
            print(f"\nPer layer of a {layers}-layer step graph (each layer its own pool and inputs, the same slots; "
                  "L2 flushed once per replay):\n")
        print("| case | pool | ours ms | FLA ms | FLA/ours | floor ms | ours/floor | target | pass |")
        print("|---|---|---:|---:|---:|---:|---:|---|:---:|")
        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for N in (1, 8, 32, 128, 256, 1024):
                ours, theirs, floor = decode_case(N, dtype, fla, bandwidth, layers=layers)
                if N <= 32:
                    target, ok = f"≥ {TARGET_VS_FLA}× FLA", theirs is not None and theirs / ours >= TARGET_VS_FLA
                else:
                    target, ok = f"≤ {TARGET_VS_FLOOR}× floor", ours / floor <= TARGET_VS_FLOOR
                print(_row(f"decode T=1 N={N}", label, ours, theirs, floor, target, ok))
                torch.cuda.empty_cache()  # a step's pools are large: give them back before the next case
            ours, theirs, floor = verify_case(64, 4, dtype, fla, bandwidth, layers=layers)
            print(_row("verify N=64 T=4, state per token", label, ours, theirs, floor, f"≤ {TARGET_VS_FLOOR}× floor",
                       ours / floor <= TARGET_VS_FLOOR))
    if not args.no_softplus:
        softplus_rows(bandwidth)
    t_pool, t_dense = chunked_prefill_case(8, 256)
    print(f"\nchunked prefill N=8 × 256 (fp32): from the pool {t_pool:.4f} ms, dense states {t_dense:.4f} ms, "
          f"ratio {t_pool / t_dense:.3f} (target ≤ 1.05: {'pass' if t_pool / t_dense <= 1.05 else 'fail'})")
    if args.sweep:
        sweep(bandwidth)


def softplus_rows(bandwidth: float) -> None:
    """Decode T=1 N=256 with the softplus gate against the bounded gate (issue 10: within 1.05×)."""
    print(f"\ndecode T=1 N=256 with the softplus gate (lower_bound=None) against the bounded gate "
          f"(target ≤ {TARGET_SOFTPLUS}×):\n")
    print("| pool | bounded ms | softplus ms | softplus/bounded | pass |")
    print("|---|---:|---:|---:|:---:|")
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        bounded = decode_case(256, dtype, None, bandwidth)[0]
        softplus = decode_case(256, dtype, None, bandwidth, lower_bound=None)[0]
        print(f"| {label} | {bounded:.4f} | {softplus:.4f} | {softplus / bounded:.3f} | "
              f"{'pass' if softplus / bounded <= TARGET_SOFTPLUS else 'fail'} |")


def sweep(bandwidth: float) -> None:
    """One-token steps and verify with 2, 4 and 8 CTAs per head, against the rule's pick."""
    from flash_kda import api
    choices = (2, 4, 8)
    cases = [("decode", N, 1) for N in (1, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)]
    cases += [("verify", N, T) for N, T in ((1, 4), (4, 4), (8, 4), (16, 4), (64, 2), (64, 4), (64, 8), (256, 4))]
    print("\nms by CTAs per (sequence, head); * = the rule's pick\n")
    print("| step | N | T | pool | " + " | ".join(str(c) for c in choices) + " | floor ms | pick/best |")
    print("|---|---:|---:|---|" + "---:|" * (len(choices) + 2))
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for step, N, T in cases:
            picked = api._decode_ctas_per_head(label, label, N * H, api._decode_one_wave_units(0), step == "decode")
            times, floor = [], 0.0
            for ctas in choices:
                with api._forced_decode_launch(ctas):
                    if step == "decode":
                        ours, _, floor = decode_case(N, dtype, None, bandwidth)
                    else:
                        ours, _, floor = verify_case(N, T, dtype, None, bandwidth)
                times.append(ours)
            cells = [f"{t:.4f}{'*' if c == picked else ''}" for c, t in zip(choices, times)]
            print(f"| {step} | {N} | {T} | {label} | " + " | ".join(cells) + f" | {floor:.4f} | "
                  f"{times[choices.index(picked)] / min(times):.3f} |")


def band(bandwidth: float, layers: int) -> None:
    """fp32 one-token steps at 2, 4 and 8 CTAs per head, per layer of a step graph, over the (sequence, head)
    pair counts around one wave of the streamed build's launch (2 per head), at several head counts: the
    band in which the rule picks 2 depends on pairs, not on N or H."""
    from flash_kda import api
    choices = (2, 4, 8)
    print(f"\nfp32 one-token steps, µs per layer of a {layers}-layer step graph, by CTAs per (sequence, head); "
          "* = the rule's pick\n")
    print("| H | N | pairs | " + " | ".join(str(c) for c in choices) + " |")
    print("|---:|---:|---:|" + "---:|" * len(choices))
    for heads, Ns in ((32, (4, 5, 6, 7, 8, 9, 10, 12)), (16, (8, 10, 12, 14, 16, 20)), (64, (2, 3, 4, 5, 6))):
        for N in Ns:
            picked = api._decode_ctas_per_head("fp32", "fp32", N * heads, api._decode_one_wave_units(0), True)
            cells = []
            for ctas in choices:
                with api._forced_decode_launch(ctas):
                    ours = decode_case(N, torch.float32, None, bandwidth, layers=layers, heads=heads)[0]
                cells.append(f"{ours * 1e3:.1f}{'*' if ctas == picked else ''}")
                torch.cuda.empty_cache()
            print(f"| {heads} | {N} | {N * heads} | " + " | ".join(cells) + " |", flush=True)


def _row(case, dtype, ours, theirs, floor, target, ok) -> str:
    fla_ms = f"{theirs:.4f}" if theirs is not None else "—"
    ratio = f"{theirs / ours:.2f}×" if theirs is not None else "—"
    return (f"| {case} | {dtype} | {ours:.4f} | {fla_ms} | {ratio} | {floor:.4f} | {ours / floor:.2f} | {target} | "
            f"{'pass' if ok else 'fail'} |")


if __name__ == "__main__":
    main()
