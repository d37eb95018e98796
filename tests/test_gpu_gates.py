"""Every KDA gate on the GPU against the float64 token recurrence: the softplus gate (lower_bound=None)
and bounded gates beyond -5 (the anchored chunk form), with decays from e^-1e-25 (kept) to e^-1200
(wiped) per token, mixed by channel and by token; every specialisation, the pool and decode paths.
Outputs and states are poisoned first (run_case) and must come back finite."""
from __future__ import annotations

import itertools

import pytest
import torch

from flash_kda.jit.spec import STATE_DTYPES, V_BLOCKS

import test_gpu_serving as serving
from kda_inputs import make_inputs
from test_gpu_kernels import assert_close, run_case

pytestmark = pytest.mark.gpu

# g + dt_bias per token and channel (dt_bias is 0 here, so g carries it); bf16 holds +-60 exactly
# (chunk_mix: 16-token chunks alternately moderate and wiping, so that the kernel's producers switch between
# the centred and the anchored chunk form inside one sequence)
PATTERNS = ("normal", "wide", "wipe", "keep", "channel_mix", "token_mix", "chunk_mix")


def with_gate_logits(inp: dict, pattern: str, a_log: float, seed: int) -> dict:
    g = inp["g"]
    gen = torch.Generator().manual_seed(seed)
    if pattern == "normal":
        x = torch.randn(g.shape, generator=gen)
    elif pattern == "wide":
        x = torch.randn(g.shape, generator=gen) * 8
    elif pattern == "wipe":
        x = torch.full(g.shape, 60.0)
    elif pattern == "keep":
        x = torch.full(g.shape, -60.0)
    elif pattern == "channel_mix":  # each channel of each token wiped or kept at random
        x = torch.where(torch.rand(g.shape, generator=gen) < 0.5, 60.0, -60.0)
    elif pattern == "token_mix":  # whole tokens alternately wipe and keep
        x = torch.where((torch.arange(g.shape[1]) % 2 == 0)[None, :, None, None], 60.0, -60.0).expand(g.shape)
    else:  # chunk_mix
        odd_chunk = (torch.arange(g.shape[1]) // 16 % 2 == 1)[None, :, None, None]
        x = torch.where(odd_chunk, 60.0, torch.randn(g.shape, generator=gen))
    H = g.shape[2]
    return inp | {"g": x.to(g.device, torch.bfloat16), "dt_bias": torch.zeros(H, 128, device=g.device),
                  "A_log": torch.full((H,), a_log, device=g.device)}


@pytest.mark.parametrize("v_block", [None, 128], ids=["picked", "vb128"])
@pytest.mark.parametrize("a_log", [-3.0, 0.0, 3.0])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_softplus_gate_extremes(pattern, a_log, v_block):
    """Every pattern, at the width a small call picks and at 128 (registers reallocated: kda_fwd.cuh)."""
    seed = PATTERNS.index(pattern) * 10 + int(a_log) + 3
    inp = with_gate_logits(make_inputs(2, 67, 2, seed=seed), pattern, a_log, seed)
    assert_close(*run_case(inp, lower_bound=None, seed=seed, v_block=v_block))


@pytest.mark.parametrize("T", [1, 15, 16, 17, 4096])
@pytest.mark.parametrize("lower_bound", [-0.5, -5.0, -8.0, -30.0, -1e4])
def test_lower_bounds_and_lengths(lower_bound, T):
    B, H = (1, 2) if T == 4096 else (3, 2)
    inp = make_inputs(B, T, H, seed=T + int(-lower_bound) % 97)
    assert_close(*run_case(inp, lower_bound=lower_bound, seed=T))


@pytest.mark.parametrize("T", [1, 15, 16, 17, 4096])
@pytest.mark.parametrize("pattern", ["wide", "channel_mix"])
def test_softplus_gate_lengths(pattern, T):
    B, H = (1, 2) if T == 4096 else (3, 2)
    inp = with_gate_logits(make_inputs(B, T, H, seed=T + 5), pattern, 0.0, T)
    assert_close(*run_case(inp, lower_bound=None, seed=T))


@pytest.mark.parametrize("v_block", [None, 128], ids=["picked", "vb128"])
@pytest.mark.parametrize("nats", [3.0, 7.0, 12.0], ids=["factorised", "centred", "anchored"])
@pytest.mark.parametrize("varlen", [False, True])
def test_each_chunk_form(nats, varlen, v_block):
    """A steady decay of about `nats` per token and channel: 16 tokens of it fit the factorised form's
    80 nats (3), only 8 tokens do (7: the centred form), or neither (12: the anchored form)."""
    lens = [40, 0, 75, 17]
    cu = torch.tensor([0, *itertools.accumulate(lens)], device="cuda") if varlen else None
    inp = make_inputs(1, sum(lens), 2, seed=int(nats)) if varlen else make_inputs(2, 64, 2, seed=int(nats))
    gen = torch.Generator().manual_seed(int(nats))
    x = nats + 0.2 * torch.randn(inp["g"].shape, generator=gen)  # softplus(x) ~ x here
    inp = inp | {"g": x.to("cuda", torch.bfloat16), "dt_bias": torch.zeros(2, 128, device="cuda"),
                 "A_log": torch.zeros(2, device="cuda")}
    assert_close(*run_case(inp, lower_bound=None, cu_seqlens=cu, seed=int(nats), v_block=v_block), cu_seqlens=cu)


GATE_GRID = list(itertools.product((None, -8.0), STATE_DTYPES, STATE_DTYPES, (False, True), V_BLOCKS))


@pytest.mark.parametrize("lower_bound,state_in,state_out,varlen,v_block", GATE_GRID)
def test_every_anchored_specialisation(lower_bound, state_in, state_out, varlen, v_block):
    """The anchored chunk form's specialisations, fixed and varlen with empty sequences."""
    i = GATE_GRID.index((lower_bound, state_in, state_out, varlen, v_block))
    if varlen:
        lens = [37, 0, 16, 1, 146, 0]
        cu = torch.tensor([0, *itertools.accumulate(lens)], device="cuda", dtype=torch.int64 if i % 3 else torch.int32)
        inp = make_inputs(1, int(cu[-1]), 3, seed=400 + i)
    else:
        cu = None
        inp = make_inputs(2, 100, 3, seed=400 + i)
    inp = with_gate_logits(inp, PATTERNS[i % len(PATTERNS)], (-3.0, 0.0, 3.0)[i % 3], 400 + i)
    res = run_case(inp, state_in=state_in, state_out=state_out, cu_seqlens=cu, v_block=v_block,
                   lower_bound=lower_bound, seed=i)
    assert_close(*res, cu_seqlens=cu)


@pytest.mark.parametrize("noise", [0.0, 0.05], ids=["identical", "nearly collinear"])
def test_softplus_gate_with_collinear_keys(noise):
    """Every key along one direction (plus noise): I + L is as far from the identity as it gets."""
    inp = make_inputs(1, 96, 2, seed=77)
    gen = torch.Generator().manual_seed(78)
    base = torch.randn(1, 1, 2, 128, generator=gen)
    inp["k"] = (base + noise * torch.randn(1, 96, 2, 128, generator=gen)).to("cuda", torch.bfloat16)
    inp["beta"] = torch.full_like(inp["beta"], 10.0)  # beta ~ 1
    inp = with_gate_logits(inp, "wide", 0.0, 79)      # decays from ~1 to e^-20 per token
    out, final, ref_out, ref_state = run_case(inp, lower_bound=None)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert_close(out, final, ref_out, ref_state)


# ------------------------------------------------------------------ the serving paths with other gates


@pytest.fixture(params=[None, -1e4], ids=["softplus", "lb=-1e4"])
def gate(request, monkeypatch):
    monkeypatch.setattr(serving, "LOWER_BOUND", request.param)
    return request.param


@pytest.mark.parametrize("case", [c for c in serving.POOL_CASES if not c[2]][::2])
def test_pools_with_every_gate(gate, case):
    serving.test_pools_with_padded_slots_and_mixed_initial_states(*case)


@pytest.mark.usefixtures("decode_ctas")
@pytest.mark.parametrize("state_in,state_out,varlen", serving.DECODE_GRID)
def test_decode_specialisations_with_every_gate(gate, state_in, state_out, varlen):
    serving.test_every_decode_specialisation(state_in, state_out, varlen)


@pytest.mark.usefixtures("decode_ctas")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("lens", [[4, 3, 1, 4, 2], [8, 3, 1, 6, 5]])
def test_verify_with_every_gate(gate, dtype, lens):
    serving.test_per_token_states_with_accepted_tokens(dtype, True, lens)


@pytest.mark.parametrize("N,dtype", [(40, "fp32"), (100, "bf16")])
def test_large_batch_decode_with_every_gate(gate, N, dtype):
    serving.test_one_token_decode_of_a_large_batch(N, dtype)


def test_prefill_then_decode_with_the_softplus_gate(monkeypatch):
    monkeypatch.setattr(serving, "LOWER_BOUND", None)
    serving.test_prefill_then_256_decode_steps_through_the_pool()
