"""CUDA-graph capture/replay, torch.compile(fullgraph=True) and streams: bitwise equal to eager."""
from __future__ import annotations

import pytest
import torch

import flash_kda
from flash_kda import api

from kda_inputs import capture_graph, make_inputs

pytestmark = pytest.mark.gpu
NAMES = ("q", "k", "v", "g", "beta")


def _static(inp):
    return {n: inp[n].clone() for n in NAMES} | {"A_log": inp["A_log"], "dt_bias": inp["dt_bias"]}


def _call(buf, out, h0, final, cu=None):
    flash_kda.fwd(buf["q"], buf["k"], buf["v"], buf["g"], buf["beta"], 0.088, out, buf["A_log"], buf["dt_bias"],
                  -5.0, initial_state=h0, final_state=final, cu_seqlens=cu)


@pytest.mark.parametrize("varlen", [False, True], ids=["fixed", "varlen"])
def test_graph_capture_replay_matches_eager_bitwise(varlen):
    T = 200
    B = 1 if varlen else 2
    N = 6 if varlen else B
    inp = make_inputs(B, T, 3, seed=50)
    buf = _static(inp)
    h0 = torch.randn(N, 3, 128, 128, device="cuda")
    out = torch.empty_like(inp["v"])
    final = torch.empty_like(h0)
    # varlen: a fixed number of sequences, padded with zero-length ones
    cu = torch.tensor([0, 50, 120, 200, 200, 200, 200], device="cuda") if varlen else None
    graph = capture_graph(lambda: _call(buf, out, h0, final, cu))
    for seed in (51, 52):
        new = make_inputs(B, T, 3, seed=seed)
        for n in NAMES:
            buf[n].copy_(new[n])
        h0.copy_(torch.randn_like(h0))
        if varlen:
            cu.copy_(torch.tensor([0, 10, 10, 90, 150, 199, 200], device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_final = torch.empty_like(out), torch.empty_like(final)
        _call(buf, ref_out, h0, ref_final, cu)
        torch.cuda.synchronize()
        assert torch.equal(out, ref_out) and torch.equal(final, ref_final)


def test_first_call_inside_capture_explains_itself():
    inp = make_inputs(1, 16, 1, seed=53)
    out = torch.empty_like(inp["v"])
    final = torch.empty(1, 1, 128, 128, device="cuda", dtype=torch.bfloat16)
    from flash_kda import jit
    from flash_kda.jit.spec import KernelSpec
    jit._loaded.pop((KernelSpec("bf16", "bf16", v_block=32), 0), None)  # as in a fresh process
    api._launchers.clear()  # fwd's own cache of loaded kernels
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="during CUDA graph capture"):
        with torch.cuda.graph(graph):
            flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.1, out, None, None, -5.0,
                          initial_state=final, final_state=final, v_block=32)


def test_torch_compile_fullgraph_matches_eager_bitwise():
    inp = make_inputs(2, 64, 4, seed=54)
    h0 = torch.randn(2, 4, 128, 128, device="cuda")

    def step(q, k, v, g, beta, A_log, dt_bias, h0):
        out = torch.empty_like(v)
        final = torch.empty_like(h0)
        flash_kda.fwd(q * 1.0, k, v, g, beta, 128 ** -0.5, out, A_log, dt_bias, -5.0, initial_state=h0,
                      final_state=final)
        return out.float() * 2.0, final

    args = [inp[n] for n in NAMES] + [inp["A_log"], inp["dt_bias"], h0]
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True)(*args)
    torch.cuda.synchronize()
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def test_torch_compile_keeps_v_block():
    inp = make_inputs(1, 48, 2, seed=55)

    def step(q, k, v, g, beta, A_log, dt_bias):
        out = torch.empty_like(v)
        flash_kda.fwd(q, k, v, g, beta, 128 ** -0.5, out, A_log, dt_bias, -5.0, v_block=64)
        return out

    args = [inp[n] for n in NAMES] + [inp["A_log"], inp["dt_bias"]]
    api._launchers.clear()
    compiled = torch.compile(step, fullgraph=True)(*args)
    torch.cuda.synchronize()
    assert [key[4] for key in api._launchers] == [64]
    assert torch.equal(compiled, step(*args))


def test_launch_follows_the_current_stream():
    inp = make_inputs(1, 128, 4, seed=55)
    ref = torch.empty_like(inp["v"])
    flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.1, ref, None, None, -5.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    out = torch.empty_like(inp["v"])
    with torch.cuda.stream(side):
        flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.1, out, None, None, -5.0)
    side.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_non_current_gpu():
    inp = make_inputs(1, 64, 2, seed=56, device="cuda:1")
    out = torch.empty_like(inp["v"])
    with torch.cuda.device(0):
        flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.1, out, inp["A_log"],
                      inp["dt_bias"], -5.0)
    ref = torch.empty_like(out)
    with torch.cuda.device(1):
        flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.1, ref, inp["A_log"],
                      inp["dt_bias"], -5.0)
    torch.cuda.synchronize(1)
    assert torch.equal(out, ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_decode_step_on_a_non_current_gpu():
    """The token-by-token kernel's (CTAs a head, H, N) grid, launched in the other device's context."""
    inp = make_inputs(1, 40, 32, seed=57, device="cuda:1")
    cu = torch.arange(41, device="cuda:1", dtype=torch.int32)
    pool = torch.randn(50, 32, 128, 128, device="cuda:1").to(torch.bfloat16)
    slots = torch.randperm(50, device="cuda:1")[:40]
    results = []
    for current in (0, 1):
        states, out = pool.clone(), torch.empty_like(inp["v"])
        with torch.cuda.device(current):
            flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.1, out, inp["A_log"],
                          inp["dt_bias"], -5.0, states, states, cu, state_indices=slots, max_seqlen=1)
        torch.cuda.synchronize(1)
        results.append((out, states))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
