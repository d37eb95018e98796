"""Accuracy tables: relative RMS error of out and final_state against the float64 reference,
for every specialisation (state in x state out x fixed/varlen x V-slice width), next to FLA's
chunk_kda error on the same inputs; then every gate kind (the softplus gate with gates that take each
chunk form, bounded gates beyond -5), next to FLA's softplus path.  Usage: python benchmarks/accuracy.py"""
from __future__ import annotations

import itertools

import torch

import flash_kda
from flash_kda.jit.spec import STATE_DTYPES, V_BLOCKS
from flash_kda.reference import kda_reference

from common import fla_chunk_kda, make_inputs, rel_rms

DT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    have_fla = True
    try:
        import fla  # noqa: F401
    except ImportError:
        have_fla = False
    layouts = {"fixed B16 T512 H32": (16, 512, 32, None),
               "varlen 1024x8 H64": (1, 8192, 64, torch.arange(0, 8193, 1024, device="cuda"))}
    rows = []
    for name, (B, T, H, cu) in layouts.items():
        inp = make_inputs(B, T, H, seed=1234)
        N = cu.numel() - 1 if cu is not None else B
        h0 = torch.randn(N, H, 128, 128, device="cuda") * 0.5
        scale = 128 ** -0.5
        refs, fla_res = {}, {}
        for s_in in STATE_DTYPES:
            init = None if s_in == "none" else h0.to(DT[s_in])
            refs[s_in] = kda_reference(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], scale, inp["A_log"],
                                       inp["dt_bias"], -5.0, initial_state=init, cu_seqlens=cu)
            if have_fla:  # FLA takes an fp32 initial state only: give it the same values
                fla_res[s_in] = fla_chunk_kda(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], scale,
                                              inp["A_log"], inp["dt_bias"], -5.0,
                                              initial_state=None if init is None else init.float(), cu_seqlens=cu)
        for s_in, s_out, vb in itertools.product(STATE_DTYPES, STATE_DTYPES, V_BLOCKS):
            init = None if s_in == "none" else h0.to(DT[s_in])
            out = torch.full_like(inp["v"], float("nan"))
            final = None if s_out == "none" else torch.full((N, H, 128, 128), float("nan"), device="cuda",
                                                            dtype=DT[s_out])
            flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], scale, out, inp["A_log"],
                          inp["dt_bias"], -5.0, initial_state=init, final_state=final, cu_seqlens=cu, v_block=vb)
            ref_out, ref_state = refs[s_in]
            e_out = rel_rms(out, ref_out)
            e_state = rel_rms(final, ref_state) if final is not None else None
            f_out = f_state = None
            if have_fla:
                f_out = rel_rms(fla_res[s_in][0], ref_out)
                f_state = rel_rms(fla_res[s_in][1], ref_state)
            rows.append((name, s_in, s_out, vb, e_out, e_state, f_out, f_state))

    def fmt(x):
        return "—" if x is None else f"{x:.2e}"

    print(f"\nAccuracy vs float64 reference ({torch.cuda.get_device_name()}), relative RMS error, lower_bound -5\n")
    print("| layout | state in | state out | v_block | ours out | ours final_state | FLA out | FLA final_state (fp32) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, s_in, s_out, vb, e_out, e_state, f_out, f_state in rows:
        print(f"| {name} | {s_in} | {s_out} | {vb} | {fmt(e_out)} | {fmt(e_state)} | {fmt(f_out)} | {fmt(f_state)} |")
    worst = max(max(r[4], r[5] or 0) for r in rows)
    worst_gate = gate_table(have_fla)
    worst = max(worst, worst_gate)
    print(f"\nworst error of ours: {worst:.2e} (acceptance bound 5e-3): {'PASS' if worst <= 5e-3 else 'FAIL'}")


# gate cases: (name, lower_bound, g + dt_bias as a function of the gate tensor's shape and a generator, A_log)
GATE_CASES = [
    ("softplus, g ~ N(0, 1), A_log ~ U(0, 1) (factorised chunks)", None, None, None),
    ("softplus, steady 7 nats per token (split chunks)", None, lambda shape, gen: torch.full(shape, 7.0), 0.0),
    ("softplus, g ~ N(0, 8^2), A_log 3 (anchored chunks)", None, lambda shape, gen: torch.randn(shape, generator=gen) * 8,
     3.0),
    ("softplus, +-60 by channel, A_log 3 (anchored: wipe and keep)", None,
     lambda shape, gen: torch.where(torch.rand(shape, generator=gen) < 0.5, 60.0, -60.0), 3.0),
    ("lower_bound -8", -8.0, None, None),
    ("lower_bound -1e4", -1e4, None, None),
]


def gate_table(have_fla: bool) -> float:
    """Every gate kind on varlen 4 x 512 H8 with fp32 states; FLA's softplus path beside the softplus rows."""
    H, lens = 8, [512] * 4
    cu = torch.tensor([0, 512, 1024, 1536, 2048], device="cuda")
    print("\nEvery gate kind, varlen 4x512 H8, fp32 states in and out, relative RMS error vs float64\n")
    print("| gate | ours out | ours final_state | FLA out (softplus: safe_gate=False) | FLA final_state |")
    print("|---|---:|---:|---:|---:|")
    worst = 0.0
    for name, lower_bound, logits, a_log in GATE_CASES:
        inp = make_inputs(1, sum(lens), H, seed=99)
        if logits is not None:
            gen = torch.Generator().manual_seed(5)
            inp["g"] = logits(tuple(inp["g"].shape), gen).to("cuda", torch.bfloat16)
            inp["dt_bias"] = torch.zeros(H, 128, device="cuda")
            inp["A_log"] = torch.full((H,), a_log, device="cuda")
        h0 = torch.randn(4, H, 128, 128, device="cuda") * 0.5
        args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 128 ** -0.5)
        ref_out, ref_state = kda_reference(*args, inp["A_log"], inp["dt_bias"], lower_bound, initial_state=h0,
                                           cu_seqlens=cu)
        out, final = torch.full_like(inp["v"], float("nan")), torch.full_like(h0, float("nan"))
        flash_kda.fwd(*args, out, inp["A_log"], inp["dt_bias"], lower_bound, initial_state=h0, final_state=final,
                      cu_seqlens=cu)
        e_out, e_state = rel_rms(out, ref_out), rel_rms(final, ref_state)
        worst = max(worst, e_out, e_state)
        f_out = f_state = "—"
        if have_fla and lower_bound is None:
            fo, fs = fla_chunk_kda(*args, inp["A_log"], inp["dt_bias"], None, initial_state=h0, cu_seqlens=cu)
            f_out, f_state = f"{rel_rms(fo, ref_out):.2e}", f"{rel_rms(fs, ref_state):.2e}"
        print(f"| {name} | {e_out:.2e} | {e_state:.2e} | {f_out} | {f_state} |")
    return worst


if __name__ == "__main__":
    main()
