"""Every kernel specialisation against the float64 token recurrence, on fresh random inputs."""
from __future__ import annotations

import itertools

import pytest
import torch

import flash_kda
from flash_kda.jit.spec import STATE_DTYPES, V_BLOCKS
from flash_kda.reference import kda_reference

from kda_inputs import make_inputs, rel_rms

pytestmark = pytest.mark.gpu
TOL = 5e-3
DTYPES = {"none": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def run_case(inp, *, state_in="fp32", state_out="fp32", cu_seqlens=None, lower_bound=-5.0, v_block=None,
             inplace=False, seed=0, scale=None):
    q = inp["q"]
    B, T, H, K = q.shape
    N = cu_seqlens.numel() - 1 if cu_seqlens is not None else B
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    h0 = None
    if state_in != "none":
        h0 = (torch.randn(N, H, 128, K, generator=gen) * 0.5).to(q.device, DTYPES[state_in])
    if inplace:
        final = h0
    elif state_out != "none":
        final = torch.full((N, H, 128, K), float("nan"), device=q.device, dtype=DTYPES[state_out])
    else:
        final = None
    out = torch.full(inp["v"].shape, float("nan"), device=q.device, dtype=torch.bfloat16)  # poisoned
    scale = K ** -0.5 if scale is None else scale
    ref_out, ref_state = kda_reference(q, inp["k"], inp["v"], inp["g"], inp["beta"], scale, inp["A_log"],
                                       inp["dt_bias"], lower_bound, initial_state=h0, cu_seqlens=cu_seqlens)
    flash_kda.fwd(q, inp["k"], inp["v"], inp["g"], inp["beta"], scale, out, inp["A_log"], inp["dt_bias"],
                  lower_bound, initial_state=h0, final_state=final, cu_seqlens=cu_seqlens, v_block=v_block)
    torch.cuda.synchronize()
    return out, final, ref_out, ref_state


def assert_close(out, final, ref_out, ref_state, cu_seqlens=None, tol=TOL):
    if cu_seqlens is not None:  # tokens outside every sequence are not written
        cu = cu_seqlens.tolist()
        mask = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
        for a, b in zip(cu[:-1], cu[1:]):
            mask[a:b] = True
        out, ref_out = out[:, mask], ref_out[:, mask]
    assert torch.isfinite(out).all(), "out has NaN/inf (unwritten or overflowed elements)"
    err = rel_rms(out, ref_out)
    assert err <= tol, f"out rel RMS {err:.2e} > {tol}"
    if final is not None:
        assert torch.isfinite(final).all(), "final_state has NaN/inf"
        if ref_state.norm() > 0:
            err_s = rel_rms(final, ref_state)
            assert err_s <= tol, f"final_state rel RMS {err_s:.2e} > {tol}"
        else:
            assert final.abs().max() == 0


SPEC_GRID = list(itertools.product(STATE_DTYPES, STATE_DTYPES, (False, True), V_BLOCKS))


@pytest.mark.parametrize("state_in,state_out,varlen,v_block", SPEC_GRID)
def test_every_specialisation(state_in, state_out, varlen, v_block):
    i = SPEC_GRID.index((state_in, state_out, varlen, v_block))
    with_a, with_d = bool(i & 1), bool(i & 2)  # cycle A_log / dt_bias presence across the grid
    if varlen:
        lens = [37, 0, 16, 1, 146]
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), device="cuda",
                          dtype=torch.int64 if i % 3 else torch.int32)
        inp = make_inputs(1, int(cu[-1]), 3, seed=i, A_log=with_a, dt_bias=with_d)
    else:
        cu = None
        inp = make_inputs(2, 100, 3, seed=i, A_log=with_a, dt_bias=with_d)
    res = run_case(inp, state_in=state_in, state_out=state_out, cu_seqlens=cu, v_block=v_block, seed=i)
    assert_close(*res, cu_seqlens=cu)


@pytest.mark.parametrize("with_a,with_d", list(itertools.product((True, False), (True, False))))
def test_a_log_dt_bias_presence(with_a, with_d):
    inp = make_inputs(1, 80, 4, seed=7, A_log=with_a, dt_bias=with_d)
    assert_close(*run_case(inp))


@pytest.mark.parametrize("g_center", [-8.0, -4.0, 0.0, 4.0, 8.0])
@pytest.mark.parametrize("g_spread", [0.0, 1.0])
def test_gate_sweep(g_center, g_spread):
    inp = make_inputs(1, 128, 2, seed=11, g_center=g_center, g_spread=g_spread, dt_center=-g_center / 2)
    assert_close(*run_case(inp))


@pytest.mark.parametrize("dt_center", [-8.0, 8.0])
def test_dt_bias_sweep(dt_center):
    inp = make_inputs(1, 96, 2, seed=12, dt_center=dt_center)
    assert_close(*run_case(inp))


@pytest.mark.parametrize("lower_bound", [-5.0, -3.0, -1.0, -0.1, 0.0])
def test_lower_bound_range(lower_bound):
    inp = make_inputs(2, 70, 2, seed=13)
    assert_close(*run_case(inp, lower_bound=lower_bound))


@pytest.mark.parametrize("T", [1, 15, 16, 17, 33])
def test_short_and_ragged_lengths(T):
    inp = make_inputs(3, T, 2, seed=14 + T)
    assert_close(*run_case(inp))


@pytest.mark.parametrize("H", [1, 7, 128])
def test_head_counts(H):
    inp = make_inputs(1, 40, H, seed=20 + H)
    assert_close(*run_case(inp))


def test_many_short_sequences():
    gen = torch.Generator().manual_seed(3)
    lens = torch.randint(0, 6, (300,), generator=gen).tolist()
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), device="cuda")
    inp = make_inputs(1, int(cu[-1]), 2, seed=30)
    res = run_case(inp, cu_seqlens=cu)
    assert_close(*res, cu_seqlens=cu)


def test_empty_sequences_keep_their_state():
    cu = torch.tensor([0, 0, 20, 20], device="cuda", dtype=torch.int32)
    inp = make_inputs(1, 20, 2, seed=31)
    out, final, ref_out, ref_state = run_case(inp, cu_seqlens=cu)
    assert_close(out, final, ref_out, ref_state, cu_seqlens=cu)


def test_in_place_state_update():
    inp = make_inputs(2, 50, 3, seed=32)
    out, final, ref_out, ref_state = run_case(inp, inplace=True)
    assert_close(out, final, ref_out, ref_state)


def test_long_sequence_state_stays_accurate():
    inp = make_inputs(1, 2048, 2, seed=33)
    assert_close(*run_case(inp))


def test_collinear_keys_stay_finite():
    inp = make_inputs(1, 64, 2, seed=34)
    inp["k"] = inp["k"][:, :1].expand_as(inp["k"]).contiguous()  # every key identical
    inp["beta"] = torch.full_like(inp["beta"], 10.0)             # beta ~ 1
    inp["g"] = torch.full_like(inp["g"], 20.0)                    # decay ~ e^{-5} per token
    out, final, ref_out, ref_state = run_case(inp)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert_close(out, final, ref_out, ref_state)


def test_non_contiguous_inputs():
    inp = make_inputs(1, 48, 4, seed=35)
    for name in ("q", "k", "v", "g"):
        x = inp[name]
        inp[name] = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, head-major strides
        assert not inp[name].is_contiguous()
    assert_close(*run_case(inp))


def test_hostile_cu_seqlens_do_not_fault():
    inp = make_inputs(1, 40, 2, seed=36)
    cu = torch.tensor([-5, 30, 10, 1000], device="cuda")  # negative, inverted, past the end
    out = torch.zeros_like(inp["v"])
    flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.1, out, inp["A_log"], inp["dt_bias"],
                  -5.0, cu_seqlens=cu)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="cu_seqlens"):
        flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.1, out, inp["A_log"],
                      inp["dt_bias"], -5.0, cu_seqlens=cu, check_cu_seqlens=True)


def test_kda_convenience_matches_fwd():
    inp = make_inputs(2, 30, 2, seed=37)
    out, final = flash_kda.kda(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], A_log=inp["A_log"],
                               dt_bias=inp["dt_bias"], lower_bound=-5.0, output_final_state=True)
    ref_out, ref_state = kda_reference(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 128 ** -0.5,
                                       inp["A_log"], inp["dt_bias"], -5.0)
    assert_close(out, final, ref_out, ref_state)


def test_bad_input_raises_before_writing():
    inp = make_inputs(1, 16, 2, seed=38)
    out = torch.full_like(inp["v"], 7.0)
    with pytest.raises(ValueError, match="lower_bound"):
        flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.1, out, None, None, 0.5)
    with pytest.raises(TypeError, match="beta"):
        flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"].float(), 0.1, out, None, None, -5.0)
    assert (out == 7.0).all()
