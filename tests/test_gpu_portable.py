"""The portable variant's compute_80 PTX, compiled by the driver's JIT on this GPU: a check that
nothing sm_90-only leaked into it (tests/test_arch.py greps the same PTX on the CPU machine), and that
its sm_80 paths (mbarrier test_wait, no clusters) compute what the reference does. The rest of the
portable variant runs the whole GPU suite under FLASH_KDA_KERNEL=portable."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import flash_kda
from flash_kda import api
from flash_kda.jit.compiler import NVRTCCompiler
from flash_kda.jit.runtime import LoadedKernel
from flash_kda.jit.spec import KernelSpec
from flash_kda.reference import kda_reference

from kda_inputs import make_inputs, rel_rms

pytestmark = pytest.mark.gpu
TOL = 5e-3


@pytest.fixture
def ptx_kernels(monkeypatch):
    """fwd launches the sm_80 twin of each spec it picks, loaded from compute_80 PTX; yields the specs
    that ran."""
    ran: list = []
    loaded: dict = {}

    def from_ptx(spec, device_index):
        twin = dataclasses.replace(spec, arch="sm_80", **({"cluster": 1} if isinstance(spec, KernelSpec) else {}))
        if twin not in loaded:
            ptx = NVRTCCompiler()._compile(twin, ptx=True, verbose=False)[0]
            assert b".target sm_80" in ptx
            loaded[twin] = LoadedKernel(twin, ptx, device_index)  # cuModuleLoadData JIT-compiles the PTX
            assert loaded[twin].threads == spec.threads
        ran.append(twin)
        return loaded[twin]

    monkeypatch.setattr(api, "get_kernel", from_ptx)
    monkeypatch.setattr(api, "_launchers", {})  # restored at teardown: the twins' launchers go with it
    yield ran


@pytest.mark.parametrize("lower_bound,v_block", [(-5.0, 32), (-5.0, 64), (-5.0, 128), (None, 64), (-8.0, 32)])
@pytest.mark.parametrize("T", [1, 3, 200])
def test_compute_80_ptx_runs_on_this_gpu(ptx_kernels, decode_ctas, lower_bound, v_block, T):
    inp = make_inputs(2, T, 4, seed=T + v_block, dt_center=0.0 if lower_bound is not None else -1.0)
    gen = torch.Generator().manual_seed(T)
    h0 = (torch.randn(2, 4, 128, 128, generator=gen) * 0.5).cuda()
    final = torch.full_like(h0, float("nan"))
    out = torch.full_like(inp["v"], float("nan"))
    flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 128 ** -0.5, out, inp["A_log"],
                  inp["dt_bias"], lower_bound, initial_state=h0, final_state=final, v_block=v_block)
    torch.cuda.synchronize()
    ref_out, ref_state = kda_reference(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 128 ** -0.5,
                                       inp["A_log"], inp["dt_bias"], lower_bound, initial_state=h0)
    assert ptx_kernels and all(spec.arch == "sm_80" for spec in ptx_kernels)
    assert rel_rms(out, ref_out) <= TOL and rel_rms(final, ref_state) <= TOL


def test_the_variant_in_use_is_the_one_asked_for():
    """The suite runs once as is and once under FLASH_KDA_KERNEL=portable: this says which one ran (the
    64-wide chunked kernel is a pair of clustered CTAs, or a single CTA in the portable variant)."""
    api.reset_variant()
    inp = make_inputs(1, 32, 2, seed=5)
    out = torch.empty_like(inp["v"])
    flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 128 ** -0.5, out, inp["A_log"],
                  inp["dt_bias"], -5.0, v_block=64)
    (kernel, _), = api._launchers.values()
    variant = api.chunk_variant(api.device_arch(0))
    expected = os.environ.get("FLASH_KDA_KERNEL", "").strip().lower() or "clustered"
    assert variant == expected and kernel.spec.cluster == (2 if variant == "clustered" else 1)
    print(f"chunked kernel variant in use: {variant} ({kernel.spec.name})")
