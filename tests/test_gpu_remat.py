"""The chunked kernel's producer with PRODUCER_REMAT on (kda_chunk_layout.cuh), run on this GPU.

The Blackwell targets build their producers this way (jit/arch.py, ``producer_remat``: their ptxas
spills the producers' lane-, warp- and slot-derived addresses otherwise); no Blackwell GPU is here, so
this runs the same template code as the sm_90a build with the flag on, in both variants (clusters of
two and single CTAs), every gate kind and V-slice width, against the float64 reference."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import flash_kda
from flash_kda import api
from flash_kda.jit.spec import KernelSpec
from flash_kda.reference import kda_reference

from kda_inputs import make_inputs, rel_rms

pytestmark = pytest.mark.gpu
TOL = 5e-3


@pytest.fixture
def remat_kernels(monkeypatch):
    """fwd launches the PRODUCER_REMAT twin of each chunked spec it picks, with ``remat_kernels.cluster``
    CTAs a cluster where the spec has several slices (the test sets it); ``remat_kernels.ran`` lists
    the twins that ran."""
    real_get_kernel = api.get_kernel
    state = types.SimpleNamespace(cluster=2, ran=[])

    def remat_twin(spec, device_index):
        if isinstance(spec, KernelSpec):
            spec = dataclasses.replace(spec, producer_remat=True, cluster=state.cluster if spec.splits >= 2 else 1)
            state.ran.append(spec)
        return real_get_kernel(spec, device_index)

    monkeypatch.setattr(api, "get_kernel", remat_twin)
    monkeypatch.setattr(api, "_launchers", {})  # restored at teardown: the twins' launchers go with it
    yield state


CASES = [(-5.0, 32), (-5.0, 64), (-5.0, 128), (-8.0, 32), (-8.0, 64), (None, 32), (None, 64)]


@pytest.mark.parametrize("lower_bound,v_block", CASES)
@pytest.mark.parametrize("cluster", [1, 2])
@pytest.mark.parametrize("T,varlen", [(17, False), (600, False), (600, True)])
def test_remat_producer_matches_the_reference(remat_kernels, lower_bound, v_block, cluster, T, varlen):
    remat_kernels.cluster = cluster
    N, H = 2, 3
    inp = make_inputs(N, T, H, seed=T + v_block + cluster, dt_center=0.0 if lower_bound is not None else -1.0)
    gen = torch.Generator().manual_seed(T + cluster)
    h0 = (torch.randn(N, H, 128, 128, generator=gen) * 0.5).cuda()
    final = torch.full_like(h0, float("nan"))
    out = torch.full_like(inp["v"], float("nan"))
    q, k, v, g, beta = inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"]
    cu = None
    if varlen:  # the same tokens as one packed batch of two sequences of unequal length
        q, k, v, g, beta, out = (x.reshape(1, N * T, *x.shape[2:]) for x in (q, k, v, g, beta, out))
        cu = torch.tensor([0, T - 77, N * T], device="cuda", dtype=torch.int32)
    flash_kda.fwd(q, k, v, g, beta, 128 ** -0.5, out, inp["A_log"], inp["dt_bias"], lower_bound,
                  initial_state=h0, final_state=final, cu_seqlens=cu, v_block=v_block)
    torch.cuda.synchronize()
    ref_out, ref_state = kda_reference(q, k, v, g, beta, 128 ** -0.5, inp["A_log"], inp["dt_bias"], lower_bound,
                                       initial_state=h0, cu_seqlens=cu)
    ran = remat_kernels.ran
    assert ran and all(spec.producer_remat for spec in ran)
    assert ran[-1].cluster == (cluster if v_block < 128 else 1)
    assert "_remat_" in ran[-1].name
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert rel_rms(out, ref_out) <= TOL and rel_rms(final, ref_state) <= TOL
