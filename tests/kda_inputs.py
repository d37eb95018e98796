"""Random KDA inputs and error metrics shared by the GPU tests, the accuracy table and the benchmark."""
from __future__ import annotations

import torch


def make_inputs(B: int, T: int, H: int, *, device="cuda", seed: int = 0, g_center: float = 0.0,
                g_spread: float = 1.0, dt_center: float = 0.0, A_log: bool = True, dt_bias: bool = True,
                K: int = 128, V: int = 128) -> dict:
    """bf16 q/k/v/g/beta (raw, as FLA passes them) and fp32 A_log/dt_bias."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, center=0.0):
        return (torch.randn(*shape, generator=gen) * scale + center).to(device)

    return dict(
        q=randn(B, T, H, K).bfloat16(),
        k=randn(B, T, H, K).bfloat16(),
        v=randn(B, T, H, V).bfloat16(),
        g=randn(B, T, H, K, scale=g_spread, center=g_center).bfloat16(),
        beta=randn(B, T, H).bfloat16(),
        A_log=torch.rand(H, generator=gen).to(device) if A_log else None,
        dt_bias=(torch.rand(H, K, generator=gen) + dt_center).to(device) if dt_bias else None,
    )


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 (NaN when x has NaN/inf)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("nan")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))
