"""Fast device check after a kernel change: every V-slice width against the float64 reference on a
few fixed and varlen shapes (poisoned outputs), and how many clusters of each width fit at once.
Usage (GPU machine): python tools/quick_check.py"""
from __future__ import annotations

import torch

import flash_kda
from flash_kda import api
from flash_kda.jit import get_kernel
from flash_kda.reference import kda_reference
from kda_inputs import make_inputs, rel_rms


def max_active_clusters(v_block: int) -> int:
    """cuOccupancyMaxActiveClusters for the loaded fixed-length kernel of this width."""
    from cuda.bindings import driver
    spec = api._spec("fp32", "fp32", False, v_block, "bounded", api.device_arch(0))
    kernel = get_kernel(spec, 0)
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = spec.splits * 64, 1, 1
    config.blockDimX, config.blockDimY, config.blockDimZ = spec.threads, 1, 1
    config.sharedMemBytes = kernel.smem_bytes
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = spec.cluster, 1, 1
    config.attrs = [attr]
    config.numAttrs = 1
    err, count = driver.cuOccupancyMaxActiveClusters(kernel.function, config)
    return count if err == driver.CUresult.CUDA_SUCCESS else -int(err)


def check(B, T, H, lens, v_block, seed):
    inp = make_inputs(B, T, H, seed=seed)
    cu = None
    if lens is not None:
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)
    N = len(lens) if lens is not None else B
    h0 = torch.randn(N, H, 128, 128, device="cuda") * 0.1
    out = torch.full_like(inp["v"], float("nan"))
    final = torch.full_like(h0, float("nan"))
    flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.088, out, inp["A_log"], inp["dt_bias"],
                  -5.0, initial_state=h0, final_state=final, cu_seqlens=cu, v_block=v_block)
    torch.cuda.synchronize()
    ref_out, ref_state = kda_reference(inp["q"].cpu(), inp["k"].cpu(), inp["v"].cpu(), inp["g"].cpu(),
                                       inp["beta"].cpu(), 0.088, inp["A_log"].cpu(), inp["dt_bias"].cpu(), -5.0,
                                       h0.cpu(), cu.cpu() if cu is not None else None)
    return rel_rms(out.cpu(), ref_out), rel_rms(final.cpu(), ref_state)


def main() -> None:
    worst = 0.0
    for v_block in (32, 64, 128):
        for B, T, H, lens in ((2, 300, 3, None), (1, 700, 2, [1, 0, 17, 333, 349]), (1, 64, 1, None)):
            e_out, e_state = check(B, T, H, lens, v_block, seed=v_block + T)
            worst = max(worst, e_out, e_state) if e_out == e_out and e_state == e_state else float("inf")
            print(f"vb{v_block} B{B} T{T} H{H} lens={lens}: out {e_out:.2e} final_state {e_state:.2e}", flush=True)
        print(f"vb{v_block}: max active clusters {max_active_clusters(v_block)}", flush=True)
    print(f"worst {worst:.2e}: {'OK' if worst < 5e-3 else 'FAIL'}")


if __name__ == "__main__":
    main()
