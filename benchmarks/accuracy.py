"""Accuracy table: relative RMS error of out and final_state against the float64 reference,
for every specialisation (state in x state out x fixed/varlen x V-slice width), next to FLA's
chunk_kda error on the same inputs.  Usage: python benchmarks/accuracy.py"""
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
    print(f"\nworst error of ours: {worst:.2e} (acceptance bound 5e-3): {'PASS' if worst <= 5e-3 else 'FAIL'}")


if __name__ == "__main__":
    main()
