"""The serving path on the GPU against the float64 token recurrence: state pools addressed by slot,
decode and speculative verify (per-token states), checkpoints, strided inputs, graphs and
torch.compile. Outputs, pools and checkpoints are poisoned first; slots a call does not address
must come back bitwise unchanged."""
from __future__ import annotations

import itertools

import pytest
import torch

import flash_kda
from flash_kda.reference import kda_reference

from kda_inputs import capture_graph, make_inputs, rel_rms

pytestmark = pytest.mark.gpu
TOL = 5e-3
VK = 128 * 128
DT = {"bf16": torch.bfloat16, "fp32": torch.float32}
LOWER_BOUND: float | None = -5.0  # the gate of every call here; test_gpu_gates.py reruns some tests with others


def make_pool(slots: int, H: int, dtype, *, pad: int = 0, seed: int = 0):
    """(storage, pool): a pool [slots, H, V, K] of random states inside a storage with ``pad`` extra
    elements after every slot (a paged cache)."""
    gen = torch.Generator().manual_seed(seed)
    storage = (torch.randn(slots, H * VK + pad, generator=gen) * 0.5).to("cuda", dtype)
    return storage, storage[:, :H * VK].view(slots, H, 128, 128)


def varlen_inputs(lens, H, seed):
    cu = torch.tensor([0, *itertools.accumulate(lens)], device="cuda", dtype=torch.int32)
    return make_inputs(1, int(cu[-1]), H, seed=seed), cu


def call(inp, out, **kw):
    return flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 128 ** -0.5, out, inp["A_log"],
                         inp["dt_bias"], LOWER_BOUND, **kw)


def assert_other_slots_unchanged(storage, before, indices):
    """Every slot of ``storage`` that ``indices`` does not address is bitwise what it was."""
    untouched = torch.ones(storage.shape[0], dtype=torch.bool, device="cuda")
    untouched[indices.long()] = False
    assert torch.equal(storage[untouched], before[untouched])


def step_in_place_and_check(inp, cu, storage, pool, indices, max_seqlen):
    """One call of the sequences of ``cu`` through slots ``indices`` of ``pool`` (inside ``storage``), in
    place: outputs and the addressed states against the recurrence, every other slot bitwise unchanged."""
    before = storage.clone()
    out = torch.full_like(inp["v"], float("nan"))
    call(inp, out, initial_state=pool, final_state=pool, cu_seqlens=cu, state_indices=indices, max_seqlen=max_seqlen)
    torch.cuda.synchronize()
    ref_out, ref_state = reference(inp, before[:, :pool[0].numel()].view(pool.shape)[indices].clone(), cu)
    assert torch.isfinite(out).all() and rel_rms(out, ref_out) <= TOL
    assert rel_rms(pool[indices], ref_state) <= TOL
    assert_other_slots_unchanged(storage, before, indices)


def reference(inp, initial, cu=None, token_states=None):
    return kda_reference(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 128 ** -0.5, inp["A_log"],
                         inp["dt_bias"], LOWER_BOUND, initial_state=initial, cu_seqlens=cu, token_states=token_states)


def token_rows(cu, seqs, T=None, B=None):
    """Boolean masks over the packed token axis (varlen) for the given sequences."""
    mask = torch.zeros(int(cu[-1]), dtype=torch.bool, device="cuda")
    for i in seqs:
        mask[int(cu[i]):int(cu[i + 1])] = True
    return mask


# ------------------------------------------------------------------ pools (1-D state_indices)

# the input pool's pad: 36 makes every other bf16 slot start 8 bytes past a 16-byte boundary (the streamed
# build copies those rows 8 bytes a lane, kda_decode.cuh); 40 keeps padded bf16 slots 16-byte aligned (its
# 16-byte copies)
POOL_CASES = [(*case, pad) for case in itertools.product(
    ("bf16", "fp32"), ("bf16", "fp32"), (True, False),  # state dtypes in/out, in place (one dtype then)
    ([37, 0, 16, 1, 146], [3, 1, 7, 2], [1, 1, 1, 1]),  # chunked kernel / decode kernel: verify's builds, one-token
) if not (case[2] and case[0] != case[1])
    for pad in ((36, 40) if case[0] == "bf16" and case[3] == [1, 1, 1, 1] else (36,))]


@pytest.mark.usefixtures("decode_ctas")
@pytest.mark.parametrize("dtype_in,dtype_out,inplace,lens,pad", POOL_CASES)
def test_pools_with_padded_slots_and_mixed_initial_states(dtype_in, dtype_out, inplace, lens, pad):
    i = POOL_CASES.index((dtype_in, dtype_out, inplace, lens, pad))
    H, N, slots = 3, len(lens), 12
    inp, cu = varlen_inputs(lens, H, seed=i)
    storage_in, pool_in = make_pool(slots, H, DT[dtype_in], pad=pad, seed=i)
    storage_out, pool_out = (storage_in, pool_in) if inplace else make_pool(slots + 3, H, DT[dtype_out], pad=8, seed=99)
    before_in, before_out = storage_in.clone(), storage_out.clone()
    indices = torch.tensor([7, 2, 11, 0, 5][:N], device="cuda", dtype=torch.int64 if i % 2 else torch.int32)
    has_initial = torch.tensor([True, False, True, False, True][:N], device="cuda")
    out = torch.full_like(inp["v"], float("nan"))
    call(inp, out, initial_state=pool_in, final_state=pool_out, cu_seqlens=cu, state_indices=indices,
         has_initial_state=has_initial, max_seqlen=max(lens))
    torch.cuda.synchronize()

    initial = before_in[:, :H * VK].view(slots, H, 128, 128)[indices.long()].clone()
    initial[~has_initial] = 0
    ref_out, ref_state = reference(inp, initial, cu)
    assert torch.isfinite(out).all()
    assert rel_rms(out, ref_out) <= TOL
    written = pool_out[indices.long()]
    assert torch.isfinite(written).all() and rel_rms(written, ref_state) <= TOL
    assert_other_slots_unchanged(storage_out, before_out, indices)
    assert torch.equal(storage_out[:, H * VK:], before_out[:, H * VK:])          # the padding too
    if not inplace:
        assert torch.equal(storage_in, before_in)                                # the input pool is only read


@pytest.mark.usefixtures("decode_ctas")
@pytest.mark.parametrize("lens", [[20, 33, 17, 40], [1, 1, 1, 1]], ids=["chunked", "decode"])
def test_invalid_slots_skip_their_sequence(lens):
    H, slots = 2, 6
    inp, cu = varlen_inputs(lens, H, seed=40)
    storage, pool = make_pool(slots, H, torch.float32, seed=41)
    before = storage.clone()
    indices = torch.tensor([-1, 3, slots, 2**31 - 1], device="cuda", dtype=torch.int32)  # only sequence 1 is valid
    out = torch.full_like(inp["v"], float("nan"))
    call(inp, out, initial_state=pool, final_state=pool, cu_seqlens=cu, state_indices=indices, max_seqlen=max(lens))
    torch.cuda.synchronize()
    ref_out, ref_state = reference(inp, before.view(slots, H, 128, 128)[[0, 3, 0, 0]].clone(), cu)
    valid = token_rows(cu, [1])
    assert torch.isnan(out[:, ~valid]).all(), "rows of skipped sequences must not be written"
    assert rel_rms(out[:, valid], ref_out[:, valid]) <= TOL
    assert rel_rms(pool[3], ref_state[1]) <= TOL
    others = [s for s in range(slots) if s != 3]
    assert torch.equal(storage[others], before[others])


DECODE_GRID = list(itertools.product(("none", "bf16", "fp32"), ("none", "bf16", "fp32"), (False, True)))


@pytest.mark.usefixtures("decode_ctas")
@pytest.mark.parametrize("state_in,state_out,varlen", DECODE_GRID)
def test_every_decode_specialisation(state_in, state_out, varlen):
    """The token-by-token kernel (T <= 15) with dense states, every state dtype pair, against the recurrence."""
    H = 3
    seed = 200 + DECODE_GRID.index((state_in, state_out, varlen))
    if varlen:
        inp, cu = varlen_inputs([5, 0, 1, 15, 9], H, seed)
        N, max_seqlen = 5, 15
    else:
        inp, cu, N, max_seqlen = make_inputs(4, 7, H, seed=seed), None, 4, None
    gen = torch.Generator().manual_seed(seed)
    h0 = None if state_in == "none" else (torch.randn(N, H, 128, 128, generator=gen) * 0.5).to("cuda", DT[state_in])
    final = None if state_out == "none" else torch.full((N, H, 128, 128), float("nan"), device="cuda",
                                                        dtype=DT[state_out])
    out = torch.full_like(inp["v"], float("nan"))
    call(inp, out, initial_state=h0, final_state=final, cu_seqlens=cu, max_seqlen=max_seqlen)
    torch.cuda.synchronize()
    ref_out, ref_state = reference(inp, h0, cu)
    mask = token_rows(cu, range(N)) if varlen else slice(None)
    assert torch.isfinite(out[:, mask]).all() and rel_rms(out[:, mask], ref_out[:, mask]) <= TOL
    if final is not None:
        assert torch.isfinite(final).all() and rel_rms(final, ref_state) <= TOL


@pytest.mark.usefixtures("decode_ctas")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_wrong_max_seqlen_hint_changes_only_the_speed(dtype):
    """max_seqlen=1 on sequences of up to 9 tokens launches a one-token step (the streamed build at 2 or
    4 CTAs a head): a later token is loaded when needed, and the results are the recurrence's."""
    H, slots = 2, 9
    lens = [1, 5, 0, 9, 2]
    inp, cu = varlen_inputs(lens, H, seed=60)
    storage, pool = make_pool(slots, H, DT[dtype], pad=8, seed=61)
    step_in_place_and_check(inp, cu, storage, pool, torch.tensor([3, 0, 7, 5, 1], device="cuda"), max_seqlen=1)


# ------------------------------------------------------------------ speculative verify: per-token states


@pytest.mark.usefixtures("decode_ctas")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("with_accepted", [True, False])
@pytest.mark.parametrize("lens", [[4, 3, 1, 4, 2], [8, 3, 1, 6, 5]])  # the token-outer build: one round, two
def test_per_token_states_with_accepted_tokens(dtype, with_accepted, lens):
    H, T_max = 2, max(lens)
    N = len(lens)
    inp, cu = varlen_inputs(lens, H, seed=50)
    slots = N * T_max + 20
    storage, pool = make_pool(slots, H, DT[dtype], pad=16, seed=51)
    before = storage.clone()
    perm = torch.randperm(slots, generator=torch.Generator().manual_seed(52))
    indices = perm[:N * T_max].view(N, T_max).clone()
    indices[0, 3] = -1   # the state after token 3 of sequence 0 is not stored
    indices[3, 1] = -1
    accepted = torch.tensor([2, 1, 1, 3, 2], dtype=torch.int32) if with_accepted else None
    start_col = (accepted.long() - 1) if with_accepted else torch.zeros(N, dtype=torch.long)
    start_slots = indices.gather(1, start_col[:, None])[:, 0]
    indices, cuda_accepted = indices.cuda(), accepted.cuda() if with_accepted else None
    out = torch.full_like(inp["v"], float("nan"))
    call(inp, out, initial_state=pool, final_state=pool, cu_seqlens=cu, state_indices=indices,
         num_accepted_tokens=cuda_accepted, max_seqlen=T_max)
    torch.cuda.synchronize()

    initial = before[:, :H * VK].view(slots, H, 128, 128)[start_slots.cuda()].clone()
    steps: list = []
    ref_out, _ = reference(inp, initial, cu, token_states=steps)
    assert torch.isfinite(out).all() and rel_rms(out, ref_out) <= TOL
    stored = torch.zeros(slots, dtype=torch.bool)
    for i, n in enumerate(lens):
        for j in range(n):
            slot = int(indices[i, j])
            if slot < 0:
                continue
            stored[slot] = True
            assert rel_rms(pool[slot], steps[j][i]) <= TOL, (i, j)
    assert torch.equal(storage[~stored.cuda()], before[~stored.cuda()])  # every other slot bitwise unchanged


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("ckpt_dtype", ["fp32", "bf16"])
def test_checkpoints_are_bitwise_the_final_state_of_the_prefix(ckpt_dtype):
    H = 3
    lens = [100, 64, 37, 0, 250]
    N = len(lens)
    inp, cu = varlen_inputs(lens, H, seed=60)
    offsets = torch.tensor([[16, 64, 0], [64, 32, -5], [16, 48, 40], [16, 0, 0], [240, 128, 250]], device="cuda")
    h0 = torch.randn(N, H, 128, 128, device="cuda") * 0.5
    ckpt = torch.full((N, 3, H, 128, 128), float("nan"), device="cuda", dtype=DT[ckpt_dtype])
    out = torch.empty_like(inp["v"])
    final = torch.empty_like(h0)
    call(inp, out, initial_state=h0, final_state=final, cu_seqlens=cu, checkpoint_offsets=offsets,
         checkpoint_state=ckpt)
    torch.cuda.synchronize()
    expected_written = torch.zeros(N, 3, dtype=torch.bool)
    for c in range(3):
        # the same N sequences, each cut to its checkpoint's offset (or kept whole when it has none)
        valid = [0 < int(offsets[i, c]) <= lens[i] and int(offsets[i, c]) % 16 == 0 for i in range(N)]
        cut = [int(offsets[i, c]) if valid[i] else lens[i] for i in range(N)]
        pieces = [torch.arange(int(cu[i]), int(cu[i]) + cut[i], device="cuda") for i in range(N)]
        rows = torch.cat(pieces)
        prefix = {name: inp[name][:, rows] for name in ("q", "k", "v", "g", "beta")} | \
                 {"A_log": inp["A_log"], "dt_bias": inp["dt_bias"]}
        prefix_cu = torch.tensor([0, *itertools.accumulate(cut)], device="cuda", dtype=torch.int32)
        prefix_final = torch.empty(N, H, 128, 128, device="cuda", dtype=DT[ckpt_dtype])
        call(prefix, torch.empty_like(prefix["v"]), initial_state=h0, final_state=prefix_final, cu_seqlens=prefix_cu)
        torch.cuda.synchronize()
        for i in range(N):
            if valid[i]:
                expected_written[i, c] = True
                assert torch.equal(ckpt[i, c], prefix_final[i]), (i, c, "checkpoint != final state of the prefix")
    assert torch.isnan(ckpt[~expected_written.cuda()]).all(), "skipped checkpoints must not be written"
    ref_out, ref_state = reference(inp, h0, cu)
    assert rel_rms(final, ref_state) <= TOL and rel_rms(out, ref_out) <= TOL


# ------------------------------------------------------------------ strided inputs


@pytest.mark.usefixtures("decode_ctas")
@pytest.mark.parametrize("T", [300, 5], ids=["chunked", "decode"])
def test_strided_inputs_are_bitwise_equal_to_contiguous_ones(T):
    B, H = 2, 4
    base = make_inputs(B, T, H, seed=70)
    qkv = torch.cat([base["q"], base["k"], base["v"]], dim=-1)           # [B, T, H, 3K]: a fused projection
    g_buffer = torch.zeros(B, T, H * 128 + 64, device="cuda", dtype=torch.bfloat16)
    g_buffer[..., :H * 128] = base["g"].reshape(B, T, H * 128)
    beta_t = base["beta"].transpose(1, 2).contiguous().transpose(1, 2)   # [B, T, H] with head-major strides
    strided = dict(q=qkv[..., :128], k=qkv[..., 128:256], v=qkv[..., 256:],
                   g=g_buffer[..., :H * 128].view(B, T, H, 128), beta=beta_t,
                   A_log=base["A_log"], dt_bias=base["dt_bias"])
    assert not any(strided[n].is_contiguous() for n in ("q", "k", "v", "g", "beta"))
    h0 = torch.randn(B, H, 128, 128, device="cuda")
    results = []
    for inp in (base, strided):
        out, final = torch.empty_like(base["v"]), torch.empty_like(h0)
        call(inp, out, initial_state=h0, final_state=final)
        results.append((out, final))
    torch.cuda.synchronize()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ------------------------------------------------------------------ a conversation: prefill, then decode steps


@pytest.mark.usefixtures("decode_ctas")
def test_prefill_then_256_decode_steps_through_the_pool():
    H, slots, steps = 4, 10, 256
    lens = [1000, 700]
    inp, cu = varlen_inputs(lens, H, seed=80)
    storage, pool = make_pool(slots, H, torch.float32, seed=81)
    indices = torch.tensor([3, 7], device="cuda", dtype=torch.int32)
    has_initial = torch.tensor([False, True], device="cuda")
    initial = pool[indices.long()].clone()
    initial[0] = 0
    outs = [torch.empty_like(inp["v"])]
    call(inp, outs[0], initial_state=pool, final_state=pool, cu_seqlens=cu, state_indices=indices,
         has_initial_state=has_initial)
    decode = make_inputs(2, steps, H, seed=82)
    decode["A_log"], decode["dt_bias"] = inp["A_log"], inp["dt_bias"]
    for t in range(steps):
        step = {n: decode[n][:, t:t + 1].contiguous() for n in ("q", "k", "v", "g", "beta")} | \
               {"A_log": inp["A_log"], "dt_bias": inp["dt_bias"]}
        outs.append(torch.empty_like(step["v"]))
        call(step, outs[-1], initial_state=pool, final_state=pool, state_indices=indices)
    torch.cuda.synchronize()
    # the float64 recurrence over each whole conversation (prefill tokens, then the decode tokens)
    full = {}
    for n in ("q", "k", "v", "g", "beta"):
        parts = [torch.cat([inp[n][0, int(cu[i]):int(cu[i + 1])], decode[n][i]]) for i in range(2)]
        full[n] = torch.cat(parts)[None]
    full |= {"A_log": inp["A_log"], "dt_bias": inp["dt_bias"]}
    full_cu = torch.tensor([0, lens[0] + steps, sum(lens) + 2 * steps], device="cuda")
    ref_out, ref_state = reference(full, initial, full_cu)
    ours = torch.cat([torch.cat([outs[0][0, int(cu[i]):int(cu[i + 1])],
                                 torch.cat([o[i] for o in outs[1:]])]) for i in range(2)])[None]
    assert torch.isfinite(ours).all() and rel_rms(ours, ref_out) <= TOL
    decode_rows = torch.cat([torch.arange(lens[0], lens[0] + steps), torch.arange(sum(lens) + steps, full_cu[-1])])
    assert rel_rms(ours[:, decode_rows], ref_out[:, decode_rows]) <= TOL  # the decode steps on their own
    assert rel_rms(pool[indices.long()], ref_state) <= TOL


# ------------------------------------------------------------------ CUDA graphs and torch.compile


@pytest.mark.usefixtures("decode_ctas")
def test_graph_replay_with_new_indices_accepted_tokens_and_offsets():
    H, slots, T_max = 2, 16, 3
    lens = [3, 2, 3, 1]
    inp, cu = varlen_inputs(lens, H, seed=90)
    storage, pool = make_pool(slots, H, torch.float32, seed=91)
    indices = torch.arange(12, device="cuda", dtype=torch.int64).view(4, 3)
    accepted = torch.tensor([1, 2, 3, 1], device="cuda", dtype=torch.int32)
    out = torch.empty_like(inp["v"])

    def verify():
        call(inp, out, initial_state=pool, final_state=pool, cu_seqlens=cu, state_indices=indices,
             num_accepted_tokens=accepted, max_seqlen=T_max)

    graph = capture_graph(verify)
    gen = torch.Generator().manual_seed(92)
    for _ in range(2):
        indices.copy_(torch.randperm(slots, generator=gen)[:12].view(4, 3))
        accepted.copy_(torch.randint(1, T_max + 1, (4,), generator=gen))
        start = storage.clone()
        graph.replay()
        torch.cuda.synchronize()
        replayed_out, replayed_pool = out.clone(), storage.clone()
        storage.copy_(start)
        verify()
        torch.cuda.synchronize()
        assert torch.equal(out, replayed_out) and torch.equal(storage, replayed_pool)

    # checkpoints in a graph: new offsets between replays
    dense_h0 = torch.randn(4, H, 128, 128, device="cuda")
    final = torch.empty_like(dense_h0)
    offsets = torch.tensor([[16], [16], [16], [16]], device="cuda")
    ckpt = torch.zeros(4, 1, H, 128, 128, device="cuda")
    big, big_cu = varlen_inputs([64, 48, 33, 80], H, seed=93)

    def prefill():
        call(big, torch.empty_like(big["v"]), initial_state=dense_h0, final_state=final, cu_seqlens=big_cu,
             checkpoint_offsets=offsets, checkpoint_state=ckpt)

    graph = capture_graph(prefill)
    offsets.copy_(torch.tensor([[48], [32], [32], [64]]))
    graph.replay()
    torch.cuda.synchronize()
    replayed = ckpt.clone()
    prefill()
    torch.cuda.synchronize()
    assert torch.equal(replayed, ckpt)


def test_torch_compile_fullgraph_with_pools_matches_eager_bitwise():
    H, slots = 2, 8
    inp = make_inputs(3, 1, H, seed=95)
    storage, pool = make_pool(slots, H, torch.float32, seed=96)
    indices = torch.tensor([6, 1, 4], device="cuda", dtype=torch.int32)
    has_initial = torch.tensor([True, False, True], device="cuda")

    def step(q, k, v, g, beta, A_log, dt_bias, pool, indices, has_initial):
        out = torch.empty_like(v)
        flash_kda.fwd(q, k, v, g, beta, 128 ** -0.5, out, A_log, dt_bias, -5.0, initial_state=pool, final_state=pool,
                      state_indices=indices, has_initial_state=has_initial)
        return out * 2.0

    args = [inp[n] for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias")]
    start = storage.clone()
    eager = step(*args, pool, indices, has_initial)
    eager_pool = storage.clone()
    storage.copy_(start)
    compiled = torch.compile(step, fullgraph=True)(*args, pool, indices, has_initial)
    torch.cuda.synchronize()
    assert torch.equal(eager, compiled) and torch.equal(eager_pool, storage)


def test_torch_compile_with_absent_states_and_checkpoints():
    """None for a mutated argument (final_state, checkpoint_state) goes through torch.compile too."""
    inp = make_inputs(1, 40, 2, seed=97)
    offsets = torch.tensor([[16, 32]], device="cuda")
    ckpt = torch.zeros(1, 2, 2, 128, 128, device="cuda")

    def step(q, k, v, g, beta, A_log, dt_bias, offsets, ckpt):
        out = torch.empty_like(v)
        flash_kda.fwd(q, k, v, g, beta, 128 ** -0.5, out, A_log, dt_bias, -5.0)
        out2 = torch.empty_like(v)
        flash_kda.fwd(q, k, v, g, beta, 128 ** -0.5, out2, A_log, dt_bias, -5.0, checkpoint_offsets=offsets,
                      checkpoint_state=ckpt)
        return out, out2

    args = [inp[n] for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias")]
    eager = step(*args, offsets, ckpt)
    eager_ckpt = ckpt.clone()
    ckpt.zero_()
    compiled = torch.compile(step, fullgraph=True)(*args, offsets, ckpt)
    torch.cuda.synchronize()
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1]) and torch.equal(eager_ckpt, ckpt)


@pytest.mark.parametrize("N", [40, 100])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_token_decode_of_a_large_batch(N, dtype):
    """Large one-token batches, with the CTAs per head the host picks (bf16: the streamed build, whose
    warps share one token's work across row groups): the same results as the recurrence, other slots
    untouched."""
    H, slots = 32, N + 7
    inp = make_inputs(1, N, H, seed=300 + N)
    cu = torch.arange(N + 1, device="cuda", dtype=torch.int32)
    storage, pool = make_pool(slots, H, DT[dtype], seed=301)
    indices = torch.randperm(slots, generator=torch.Generator().manual_seed(302))[:N].to("cuda", torch.int64)
    step_in_place_and_check(inp, cu, storage, pool, indices, max_seqlen=1)


@pytest.mark.usefixtures("decode_ctas")
@pytest.mark.parametrize("lens", [[1, 1, 1], [3, 4, 2]], ids=["one-token", "verify"])
def test_a_flattened_grid_gives_the_same_results_bitwise(monkeypatch, lens):
    """A launch whose N or H exceeds gridDim.y/z's limit runs a 1-D grid whose CTAs divide their index
    (kda_decode.cuh decode_cta_of): bitwise the results of the (CTAs a head, H, N) grid."""
    from flash_kda import api
    H, slots = 3, 8
    inp, cu = varlen_inputs(lens, H, seed=70)
    _, pool = make_pool(slots, H, torch.bfloat16, seed=71)
    indices = torch.tensor([6, 1, 4], device="cuda")
    results = []
    for max_grid_yz in (api.MAX_GRID_YZ, 1):
        monkeypatch.setattr(api, "MAX_GRID_YZ", max_grid_yz)
        states = pool.clone()
        out = torch.full_like(inp["v"], float("nan"))
        call(inp, out, initial_state=states, final_state=states, cu_seqlens=cu, state_indices=indices,
             max_seqlen=max(lens))
        results.append((out, states))
    assert torch.isfinite(results[0][0]).all()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
