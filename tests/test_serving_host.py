"""The serving arguments on the host side (CPU machine, device calls stubbed): which kernel runs,
what reaches the kernel's parameters, and the errors that name each argument."""
from __future__ import annotations

import pytest
import torch

import flash_kda
from flash_kda import api, checks
from flash_kda.jit.params import (FEATURE_CHECKPOINTS, FEATURE_HAS_INITIAL, FEATURE_PER_TOKEN, FEATURE_POOL,
                                  FEATURE_STRIDED)
from flash_kda.jit.spec import DecodeSpec, KernelSpec

from stub_device import inputs, launch_params

H, VK = 2, 128 * 128


def pool(slots=6, dtype=torch.float32, pad=0):
    """A pool [slots, H, V, K], with ``pad`` elements between slots (a paged cache)."""
    storage = torch.zeros(slots, H * VK + pad, dtype=dtype)
    return storage[:, :H * VK].view(slots, H, 128, 128)


def launched(device) -> tuple:
    (spec, blocks, _, params), = device[1]
    device[1].clear()
    return spec, blocks, launch_params((spec, blocks, None, params))


def test_a_one_token_decode_step_on_a_pool_runs_the_decode_kernel(device):
    args = inputs(B=3, T=1, H=H)
    states = pool(slots=8, pad=24)
    indices = torch.tensor([5, 0, 7], dtype=torch.int32)
    flash_kda.fwd(**args | dict(initial_state=states, final_state=states), state_indices=indices)
    spec, blocks, p = launched(device)
    assert isinstance(spec, DecodeSpec) and (spec.state_in, spec.state_out, spec.varlen) == ("fp32", "fp32", False)
    assert blocks == 3 * H * 8  # a small batch: the most CTAs per head (all in one wave)
    assert p["features"] == FEATURE_POOL
    assert p["ext.pool.state_indices"] == indices.data_ptr() and p["ext.pool.indices_int64"] == 0
    assert (p["ext.pool.initial_slot_stride"], p["ext.pool.final_slot_stride"]) == (H * VK + 24, H * VK + 24)
    assert (p["ext.pool.num_slots"], p["ext.pool.indices_cols"], p["ext.pool.indices_row_stride"]) == (8, 1, 1)


@pytest.mark.parametrize("dtype,N,ctas_per_head", [(torch.float32, 1, 8), (torch.float32, 1024, 8),
                                                    (torch.float32, 4, 8), (torch.float32, 5, 8),
                                                    (torch.float32, 6, 2), (torch.float32, 10, 2),
                                                    (torch.float32, 11, 8), (torch.bfloat16, 3, 8),
                                                    (torch.bfloat16, 4, 2), (torch.bfloat16, 1024, 2)])
def test_decode_shares_a_warps_token_work_across_rows_beyond_one_wave(device, dtype, N, ctas_per_head):
    """One-token steps of fp32 states: 8 CTAs per head (one group of rows per warp), but 2 (the streamed
    build) while those fill more than half of one wave and fit in it (166 to 330 pairs on 132 SMs at 5
    an SM). bf16 states (the streamed build), and multi-token steps of either (the token-outer build):
    2 (four groups per warp share each token's work) once the one-group CTAs would not all be resident
    (115 pairs on 132 SMs);
    multi-token steps 4 while the token-outer build's CTAs at 4 a head would be (198 pairs), then fp32
    states 8 again (bound by their bytes: the most CTAs)."""
    args = inputs(T=N, H=32, varlen=list(range(N + 1)))  # N sequences of one token
    states = torch.zeros(N, 32, 128, 128, dtype=dtype)
    flash_kda.fwd(**args | dict(initial_state=states, final_state=states), max_seqlen=1)
    spec, blocks, _ = launched(device)
    assert isinstance(spec, DecodeSpec) and spec.build == ("one_group" if ctas_per_head == 8 else "streamed")
    # from 1.5 waves (of 660 streamed CTAs) the last 5 sequences at 4 CTAs a head (api._decode_halved_tail)
    tail = 5 if ctas_per_head == 2 and N * 32 * 2 >= 1.5 * 660 else 0
    assert blocks == (N + tail) * 32 * ctas_per_head
    flash_kda.fwd(**args | dict(initial_state=states, final_state=states), max_seqlen=2)  # maybe more tokens
    spec, blocks, _ = launched(device)
    several = 8 if N * 32 <= 115 else 4 if N * 32 <= 198 else 8 if dtype is torch.float32 else 2
    assert isinstance(spec, DecodeSpec) and spec.build == ("one_group" if several == 8 else "token_outer")
    tail = 6 if several == 2 else 0  # beyond 1.5 waves of 792 token-outer CTAs: the last 6 at 4 a head
    assert blocks == (N + tail) * 32 * several


@pytest.mark.parametrize("dtype,pad", [(torch.bfloat16, 0), (torch.bfloat16, 40), (torch.bfloat16, 36),
                                       (torch.float32, 36)])
def test_one_token_steps_on_padded_pools_run_the_streamed_build(device, dtype, pad):
    """Beyond one wave of the one-group build, one-token steps run the streamed build whatever the pool's
    padding: with a pad of 36 every other bf16 slot starts 8 bytes past a 16-byte boundary, and the build
    copies those rows 8 bytes a lane instead of 16 (kda_decode.cuh; benchmarks/NOTES.md, round 31d)."""
    N = 100  # 200 (sequence, head) pairs: 2 CTAs a head for either dtype (the fp32 band, bf16 beyond one wave)
    args = inputs(T=N, H=H, varlen=list(range(N + 1)))
    states = pool(slots=2 * N, dtype=dtype, pad=pad)
    indices = torch.arange(N, dtype=torch.int32) * 2 + 1  # odd slots: 8 bytes past a boundary at a pad of 36
    flash_kda.fwd(**args | dict(initial_state=states, final_state=states), state_indices=indices, max_seqlen=1)
    spec, blocks, p = launched(device)
    assert isinstance(spec, DecodeSpec) and spec.build == "streamed"
    assert blocks == N * H * 2 and p["ext.pool.initial_slot_stride"] == H * VK + pad


@pytest.mark.parametrize("N,max_grid_yz,grid", [(3, 65535, (8, 32, 3)), (1024, 65535, (2 * 32, 1, 1024 + 5)),
                                                 (3, 2, (3 * 32 * 8, 1, 1)), (1, 32, (8, 32, 1)),
                                                 (1, 31, (32 * 8, 1, 1))])
def test_the_decode_grid_is_ctas_a_head_by_heads_by_sequences(device, monkeypatch, N, max_grid_yz, grid):
    """The token-by-token kernel's CTAs find their slice, head and sequence in blockIdx without dividing
    (kda_decode.cuh decode_cta_of); a launch of several waves comes as (CTAs a head * H, 1, N + tail), its
    last sequences twice in z (api._decode_halved_tail); a launch whose N or H exceeds gridDim.y/z's limit
    comes flattened."""
    monkeypatch.setattr(api, "MAX_GRID_YZ", max_grid_yz)
    args = inputs(T=N, H=32, varlen=list(range(N + 1)))
    states = torch.zeros(N, 32, 128, 128, dtype=torch.bfloat16)
    flash_kda.fwd(**args | dict(initial_state=states, final_state=states), max_seqlen=1)
    assert device[2] == [grid] and device[1][0][1] == grid[0] * grid[1] * grid[2]
    flash_kda.fwd(**inputs(B=2, T=32, H=3))  # the chunked kernel: a 1-D grid
    spec, blocks, _, _ = device[1][1]
    assert isinstance(spec, KernelSpec) and device[2][1] == (blocks, 1, 1)


@pytest.mark.parametrize("N,H,ctas_per_head,resident,tail", [
    (10, 32, 2, 660, 0), (15, 32, 2, 660, 0), (16, 32, 2, 660, 5), (128, 32, 2, 660, 5), (64, 32, 2, 792, 6),
    (1024, 64, 2, 660, 3), (2, 1024, 2, 660, 1), (1, 4096, 2, 660, 1), (65535, 1, 2, 660, 0),
    (65533, 1, 2, 660, 2)])
def test_a_decode_launch_of_several_waves_ends_on_halved_ctas(N, H, ctas_per_head, resident, tail):
    """From one and a half waves of resident CTAs, about one wave's worth of the last sequences run at twice
    the CTAs a head: at least one, at most all of them, and never past gridDim.z's limit."""
    assert api._decode_halved_tail(N, H, ctas_per_head, resident) == tail


def test_a_forced_decode_launch_overrides_the_rules_and_restores_them(device):
    """api._forced_decode_launch (the GPU tests' decode_ctas, the sanitizer case, bench_decode.py): the launch
    shape it asks for inside, the host's rules again after it, also when the body raises."""
    args = inputs(T=4, H=H, varlen=[0, 1, 2, 3, 4])  # 4 sequences of one token: the rule picks 8 CTAs a head
    states = torch.zeros(4, H, 128, 128, dtype=torch.bfloat16)
    step = lambda: flash_kda.fwd(**args | dict(initial_state=states, final_state=states), max_seqlen=1)  # noqa: E731
    rules = api._decode_ctas_per_head, api._decode_halved_tail, api.MAX_GRID_YZ
    with api._forced_decode_launch(2, halved_tail=True):
        step()
    assert launched(device)[0].build == "streamed" and device[2][-1] == (2 * H, 1, 4 + 2)  # the last 2 at 4 a head
    with api._forced_decode_launch(4, max_grid_yz=1):
        step()
    assert launched(device)[0].build == "streamed" and device[2][-1] == (4 * H * 4, 1, 1)  # flattened
    with pytest.raises(RuntimeError), api._forced_decode_launch(2, halved_tail=False):
        raise RuntimeError
    assert (api._decode_ctas_per_head, api._decode_halved_tail, api.MAX_GRID_YZ) == rules
    step()
    assert launched(device)[0].build == "one_group" and device[2][-1] == (8, H, 4)


def test_pools_of_different_sizes_and_dtypes_address_the_common_slots(device):
    args = inputs(B=2, T=40, H=H)
    flash_kda.fwd(**args | dict(initial_state=pool(5, torch.bfloat16), final_state=pool(9)),
                  state_indices=torch.tensor([4, 1]))
    spec, _, p = launched(device)
    assert isinstance(spec, KernelSpec) and (spec.state_in, spec.state_out) == ("bf16", "fp32")
    assert p["ext.pool.num_slots"] == 5 and p["ext.pool.indices_int64"] == 1


@pytest.mark.parametrize("max_seqlen,kernel", [(None, KernelSpec), (1, DecodeSpec), (15, DecodeSpec),
                                               (16, KernelSpec), (300, KernelSpec)])
def test_varlen_picks_the_decode_kernel_from_the_max_seqlen_hint(device, max_seqlen, kernel):
    args = inputs(T=6, H=H, varlen=[0, 1, 2, 6], state=torch.float32, final_state=torch.float32)
    flash_kda.fwd(**args, max_seqlen=max_seqlen)
    spec, blocks, _ = launched(device)
    assert type(spec) is kernel and blocks == 3 * H * spec.splits


@pytest.mark.parametrize("T,kernel", [(1, DecodeSpec), (15, DecodeSpec), (16, KernelSpec)])
def test_fixed_layout_picks_the_kernel_from_T(device, T, kernel):
    flash_kda.fwd(**inputs(B=2, T=T, H=H))
    assert type(launched(device)[0]) is kernel


def test_per_token_states_for_speculative_verify(device):
    args = inputs(T=7, H=H, varlen=[0, 4, 7])
    states = pool(10)
    indices = torch.tensor([[3, 4, 5, -1], [6, 7, 8, 9]], dtype=torch.int64)
    accepted = torch.tensor([2, 1], dtype=torch.int32)
    flash_kda.fwd(**args | dict(initial_state=states, final_state=states), state_indices=indices,
                  num_accepted_tokens=accepted)  # no max_seqlen: per-token states always run the decode kernel
    spec, _, p = launched(device)
    assert isinstance(spec, DecodeSpec) and spec.varlen
    assert p["features"] == FEATURE_POOL | FEATURE_PER_TOKEN
    assert (p["ext.pool.indices_row_stride"], p["ext.pool.indices_cols"], p["ext.pool.indices_int64"]) == (4, 4, 1)
    assert p["ext.pool.num_accepted_tokens"] == accepted.data_ptr() and p["ext.pool.accepted_int64"] == 0


def test_checkpoints_run_the_chunked_kernel_even_for_short_sequences(device):
    args = inputs(B=2, T=8, H=H, state=torch.float32, final_state=torch.float32)
    offsets = torch.tensor([[0, 16], [-1, 4]])
    ckpt = torch.zeros(2, 2, H, 128, 128, dtype=torch.bfloat16)
    flash_kda.fwd(**args, checkpoint_offsets=offsets, checkpoint_state=ckpt)
    spec, _, p = launched(device)
    assert isinstance(spec, KernelSpec) and p["features"] == FEATURE_CHECKPOINTS
    assert (p["ext.ckpt.checkpoint_offsets"], p["ext.ckpt.checkpoint_state"]) == (offsets.data_ptr(), ckpt.data_ptr())
    assert (p["ext.ckpt.num_checkpoints"], p["ext.ckpt.offsets_int64"], p["ext.ckpt.checkpoint_bf16"]) == (2, 1, 1)


def test_has_initial_state_and_strided_inputs_reach_the_kernel(device):
    T = 5
    qkv = torch.randn(1, T, H, 3 * 128).bfloat16()  # a fused projection: q, k, v are slices of it
    args = inputs(T=T, H=H, state=torch.float32, final_state=torch.float32)
    args.update(q=qkv[..., :128], k=qkv[..., 128:256], v=qkv[..., 256:])
    args["beta"] = torch.randn(1, H, T).bfloat16().transpose(1, 2)  # any strides
    has = torch.tensor([False])
    flash_kda.fwd(**args, has_initial_state=has)
    spec, _, p = launched(device)
    assert p["features"] == FEATURE_STRIDED | FEATURE_HAS_INITIAL and p["ext.pool.has_initial_state"] == has.data_ptr()
    assert p["q"] == qkv.data_ptr() and p["k"] == qkv.data_ptr() + 256 and p["v"] == qkv.data_ptr() + 512
    assert (p["ext.q.batch"], p["ext.q.token"], p["ext.q.head"]) == (T * H * 384, H * 384, 384)
    assert (p["ext.beta.batch"], p["ext.beta.token"], p["ext.beta.head"]) == (H * T, 1, T)
    assert (p["ext.g.token"], p["ext.g.head"]) == (H * 128, 128)  # contiguous ones are described too


def test_the_plain_call_fills_no_extension(device):
    flash_kda.fwd(**inputs(T=40, H=H, state=torch.float32, final_state=torch.float32))
    assert launched(device)[2]["features"] == 0


@pytest.mark.parametrize("kw", [
    dict(state_indices=torch.tensor([1, 0], dtype=torch.int32)),
    dict(state_indices=torch.tensor([[1, 2], [0, 3]]), num_accepted_tokens=torch.tensor([1, 2], dtype=torch.int32)),
    dict(has_initial_state=torch.tensor([True, False])),
    dict(checkpoint_offsets=torch.tensor([[16], [32]]), checkpoint_state=torch.zeros(2, 1, H, 128, 128)),
])
def test_fast_check_takes_serving_arguments_like_check_inputs(device, kw):
    args = inputs(B=2, T=20, H=H)
    if "state_indices" in kw:
        args.update(initial_state=pool(4), final_state=pool(4))
    else:
        args.update(initial_state=torch.zeros(2, H, 128, 128), final_state=torch.zeros(2, H, 128, 128))
    serving = tuple(kw.get(n) for n in ("state_indices", "has_initial_state", "num_accepted_tokens",
                                        "checkpoint_offsets", "checkpoint_state"))
    assert checks.fast_check(**args, serving=serving)[:8] == checks.check_inputs(**args, **kw).as_tuple()


def _bad_serving_cases():
    B = 2
    ok_pool = dict(initial_state=pool(4), final_state=pool(4))
    yield dict(ok_pool, state_indices=torch.tensor([0.0, 1.0])), TypeError, r"state_indices must be int32 or int64"
    yield dict(ok_pool, state_indices=torch.tensor([0, 1, 2])), ValueError, \
        r"state_indices must be of shape \[2\] or \[2, T_max >= 1\], got \[3\]"
    yield dict(ok_pool, state_indices=torch.zeros(B, 0, dtype=torch.int64)), ValueError, r"state_indices must be of shape"
    yield dict(state_indices=torch.tensor([0, 1])), ValueError, r"neither was given"
    yield dict(initial_state=pool(4), state_indices=torch.tensor([[0], [1]])), ValueError, \
        r"2-D state_indices stores the state after every token in final_state"
    yield dict(ok_pool, state_indices=torch.tensor([0, 1]), num_accepted_tokens=torch.tensor([1, 1])), ValueError, \
        r"num_accepted_tokens picks a column of a 2-D state_indices"
    yield dict(ok_pool, state_indices=torch.tensor([[0], [1]]), num_accepted_tokens=torch.tensor([1.0, 1.0])), \
        TypeError, r"num_accepted_tokens must be int32 or int64"
    yield dict(has_initial_state=torch.tensor([1, 0])), TypeError, r"has_initial_state must be of dtype torch.bool"
    yield dict(has_initial_state=torch.tensor([True])), ValueError, r"has_initial_state must be of shape \[2\]"
    yield dict(checkpoint_offsets=torch.tensor([[16], [16]])), ValueError, \
        r"checkpoint_offsets and checkpoint_state go together"
    yield dict(checkpoint_offsets=torch.tensor([[16], [16]]), checkpoint_state=torch.zeros(2, 2, H, 128, 128)), \
        ValueError, r"checkpoint_state must be of shape \[2, 1, 2, 128, 128\]"
    yield dict(checkpoint_offsets=torch.tensor([[16], [16]]), checkpoint_state=torch.zeros(2, 1, H, 128, 128,
                                                                                           dtype=torch.float16)), \
        TypeError, r"checkpoint_state must be float32 or bfloat16"
    yield dict(ok_pool, state_indices=torch.tensor([[0], [1]]), checkpoint_offsets=torch.tensor([[16], [16]]),
               checkpoint_state=torch.zeros(2, 1, H, 128, 128)), ValueError, r"checkpoints come from the chunked"
    yield dict(initial_state=pool(4).transpose(2, 3), final_state=pool(4), state_indices=torch.tensor([0, 1])), \
        ValueError, r"initial_state must be a pool of contiguous, 16-byte aligned slots"
    yield dict(initial_state=torch.zeros(4, H, 128, 128), state_indices=torch.tensor([0, 1]),
               final_state=torch.zeros(4, H + 1, 128, 128)), ValueError, \
        r"final_state must be a pool of shape \[slots, 2, 128, 128\]"
    yield dict(max_seqlen=-1), ValueError, r"max_seqlen must be None or an int >= 0"
    yield dict(max_seqlen="8"), TypeError, r"max_seqlen must be None or an int >= 0"
    yield dict(max_seqlen=8.0), TypeError, r"max_seqlen must be None or an int >= 0"


@pytest.mark.parametrize("kw,exc,pattern", list(_bad_serving_cases()))
def test_bad_serving_arguments_are_named(device, kw, exc, pattern):
    args = inputs(B=2, T=20, H=H)
    args.update({k: v for k, v in kw.items() if k in ("initial_state", "final_state")})
    serving = {k: v for k, v in kw.items() if k not in ("initial_state", "final_state")}
    with pytest.raises(exc, match=pattern):
        flash_kda.fwd(**args, **serving)
    assert device[1] == []


def test_index_values_are_checked_on_request(device):
    args = inputs(T=9, H=H, varlen=[0, 4, 9])
    states = pool(3)
    args.update(initial_state=states, final_state=states)
    cases = [
        (dict(state_indices=torch.tensor([2, 3])), r"state_indices\[1\] = 3 is not a slot of the pools \(0 <= slot < 3\)"),
        (dict(state_indices=torch.tensor([-1, 0])), r"state_indices\[0\] = -1 is not a slot"),
        (dict(state_indices=torch.tensor([[0, 1], [2, -1]]), num_accepted_tokens=torch.tensor([1, 3])),
         r"num_accepted_tokens\[1\] = 3 must lie in \[1, T_max = 2\]"),
        (dict(state_indices=torch.tensor([[0, 1], [-1, 2]])), r"state_indices\[1, 0\] = -1, the slot sequence 1 starts"),
        (dict(state_indices=torch.tensor([[0, 5], [1, 2]])), r"state_indices\[0, 1\] = 5 is past the pools' 3 slots"),
    ]
    for kw, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            flash_kda.fwd(**args, **kw, check_indices=True)
        flash_kda.fwd(**args, **kw, check_indices=False)  # without the check: launched, the kernel skips
    assert len(device[1]) == len(cases)
    device[1].clear()
    dense = inputs(T=40, H=H, varlen=[0, 33, 40], state=torch.float32, final_state=torch.float32)
    offsets = torch.tensor([[16, 20], [48, 0]])  # 20 is inside sequence 0 and not a chunk end; 48 is past sequence 1
    ckpt = torch.zeros(2, 2, H, 128, 128)
    with pytest.raises(ValueError, match=r"checkpoint_offsets\[0, 1\] = 20 is not a multiple of 16"):
        flash_kda.fwd(**dense, checkpoint_offsets=offsets, checkpoint_state=ckpt, check_indices=True)
    offsets[0, 1] = 32
    flash_kda.fwd(**dense, checkpoint_offsets=offsets, checkpoint_state=ckpt, check_indices=True)
    assert len(device[1]) == 1


def test_the_custom_op_carries_the_serving_arguments():
    schema = str(torch.ops.flash_kda.fwd.default._schema)
    for part in ("Tensor? state_indices=None", "Tensor? has_initial_state=None", "Tensor? num_accepted_tokens=None",
                 "SymInt? max_seqlen=None", "Tensor? checkpoint_offsets=None", "Tensor(", "checkpoint_state=None",
                 "bool? check_indices=None"):
        assert part in schema, (part, schema)

