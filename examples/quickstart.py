"""Quickstart: run KDA on a GPU and check it against the float64 reference.

Without a supported GPU it compiles the kernels for sm_90a (what a deployment image for H100s would
bake; `python -m flash_kda precompile --arch all` bakes every target) and runs the reference on the
CPU, saying so."""
from __future__ import annotations

import time

import torch

import flash_kda
from flash_kda.jit.arch import REFERENCE_TARGET, arch_for_capability
from flash_kda.reference import kda_reference


def inputs(device: str, B: int = 2, T: int = 300, H: int = 4):
    torch.manual_seed(0)
    q, k, g = (torch.randn(B, T, H, 128, device=device).bfloat16() for _ in range(3))
    v = torch.randn(B, T, H, 128, device=device).bfloat16()
    beta = torch.randn(B, T, H, device=device).bfloat16()
    A_log, dt_bias = torch.rand(H, device=device), torch.rand(H, 128, device=device)
    h0 = torch.randn(B, H, 128, 128, device=device)
    return q, k, v, g, beta, A_log, dt_bias, h0


def main() -> None:
    on_gpu = torch.cuda.is_available() and arch_for_capability(*torch.cuda.get_device_capability()) is not None
    device = "cuda" if on_gpu else "cpu"
    q, k, v, g, beta, A_log, dt_bias, h0 = inputs(device)
    scale = 128 ** -0.5
    ref_out, ref_state = kda_reference(q, k, v, g, beta, scale, A_log, dt_bias, -5.0, initial_state=h0)
    if on_gpu:
        out, state = flash_kda.kda(q, k, v, g, beta, scale, A_log=A_log, dt_bias=dt_bias, lower_bound=-5.0,
                                   initial_state=h0, output_final_state=True)
        err_o = float((out.double() - ref_out).norm() / ref_out.norm())
        err_s = float((state.double() - ref_state).norm() / ref_state.norm())
        print(f"flash_kda on {torch.cuda.get_device_name()}: relative RMS error vs float64 reference: "
              f"out {err_o:.2e}, final_state {err_s:.2e}")
        ok = err_o < 5e-3 and err_s < 5e-3
        print("OK" if ok else "FAILED")
        raise SystemExit(0 if ok else 1)
    print(f"No supported GPU here: compiling every kernel for {REFERENCE_TARGET} and running the reference on CPU.")
    start = time.perf_counter()
    entries = flash_kda.precompile(archs=(REFERENCE_TARGET,))
    print(f"compiled/cached {len(entries)} kernel specialisations in {time.perf_counter() - start:.1f} s "
          f"into {entries[0].path.parent.parent}")
    print(f"reference on CPU: out {tuple(ref_out.shape)} |out| mean {ref_out.abs().mean():.4f}, "
          f"final_state {tuple(ref_state.shape)}")
    print("OK (CPU mode: kernels compiled, nothing launched)")


if __name__ == "__main__":
    main()
