"""Random KDA inputs and error metrics shared by the GPU tests, the accuracy table and the benchmark."""
from __future__ import annotations

import os

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


def capture_graph(step) -> torch.cuda.CUDAGraph:
    """Run ``step()`` once eagerly (its kernels compile and load outside capture, the usual warm-up),
    then capture it into a CUDA graph."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 (NaN when x has NaN/inf)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("nan")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def fla_chunk_kda(q, k, v, g, beta, scale, A_log, dt_bias, lower_bound, initial_state=None,
                  output_final_state=True, cu_seqlens=None):
    """FLA's own Triton ``chunk_kda`` (FLA_FLASH_KDA=0 switches its FlashKDA backend off)."""
    from fla.ops.kda import chunk_kda
    saved = os.environ.get("FLA_FLASH_KDA")
    os.environ["FLA_FLASH_KDA"] = "0"
    try:
        with torch.inference_mode():
            return chunk_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, use_qk_l2norm_in_kernel=True,
                             use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, safe_gate=lower_bound is not None,
                             lower_bound=lower_bound, state_v_first=True, cu_seqlens=cu_seqlens,
                             A_log=A_log, dt_bias=dt_bias)
    finally:
        if saved is None:
            del os.environ["FLA_FLASH_KDA"]
        else:
            os.environ["FLA_FLASH_KDA"] = saved
