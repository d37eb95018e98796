"""Calls for compute-sanitizer (memcheck): every kernel family and width on hostile but unchecked inputs.

Varlen with an empty and a length-1 sequence; the general gates (every chunk form); pools addressed by
negative, past-the-end and huge slots (one-token steps on bf16 pools too, their slots 16-byte aligned or
not); 2-D slots with num_accepted_tokens of 0 and past T_max; checkpoint offsets that are negative,
past the sequence, not multiples of 16, or huge; strided inputs. Calls that run the token-by-token
kernel run through each of its launch shapes (8 CTAs a head, and the streamed or token-outer build at
4 and 2, each with its last sequences at twice that; and the flattened grid). None
of it may touch memory out of bounds. Usage: compute-sanitizer --tool memcheck python tools/sanitize_case.py
"""
import torch

import flash_kda
from flash_kda import api
from kda_inputs import make_inputs


def decode_shapes(call) -> None:
    """call() once per launch shape of the token-by-token kernel, whatever the host's rule would pick: 8, 4
    and 2 CTAs a head on the (CTAs a head, H, N) grid, 4 and 2 with the last half of the sequences at twice
    that on the (CTAs a head * H, 1, N + tail) grid (api._decode_halved_tail), and 2 on the flattened grid
    (N or H too large)."""
    for ctas, halved, max_grid_yz in ((8, False, None), (4, False, None), (2, False, None), (4, True, None),
                                      (2, True, None), (2, False, 1)):
        with api._forced_decode_launch(ctas, halved, max_grid_yz):
            call()


H = 3
cu = torch.tensor([0, 37, 37, 38, 100, 165], device="cuda", dtype=torch.int32)
inp = make_inputs(1, 165, H, seed=5)
args = lambda x: (x["q"], x["k"], x["v"], x["g"], x["beta"], 0.088)  # noqa: E731
gates = (inp["A_log"], inp["dt_bias"], -5.0)
h0 = torch.randn(5, H, 128, 128, device="cuda")
for vb in (32, 64, 128):
    out = torch.empty_like(inp["v"])
    final = torch.empty(5, H, 128, 128, device="cuda", dtype=torch.bfloat16)
    flash_kda.fwd(*args(inp), out, *gates, initial_state=h0, final_state=final, cu_seqlens=cu, v_block=vb)
    flash_kda.fwd(*args(inp), out, *gates, initial_state=h0, final_state=h0, cu_seqlens=cu.long(), v_block=vb)

# the general gates: softplus with chunks of every form (factorised, centred, anchored), and lower_bound -1e4
mixed = dict(inp, g=torch.cat([torch.randn(1, 60, H, 128), torch.full((1, 50, H, 128), 7.0),
                               torch.full((1, 55, H, 128), 60.0)], 1).to("cuda", torch.bfloat16))
for lower_bound in (None, -1e4):
    def general_gate(vb=None, max_seqlen=15, lower_bound=lower_bound):
        flash_kda.fwd(*args(mixed), torch.empty_like(inp["v"]), inp["A_log"], inp["dt_bias"], lower_bound,
                      initial_state=h0, final_state=final, cu_seqlens=cu, v_block=vb, max_seqlen=max_seqlen)
    for vb in (32, 64, 128):
        general_gate(vb, None)
    decode_shapes(general_gate)

# pools: hostile 1-D slots, chunked and decode kernels, padded slot stride
storage = torch.randn(6, H * 128 * 128 + 24, device="cuda")
pool = storage[:, :H * 128 * 128].view(6, H, 128, 128)
hostile = torch.tensor([-1, 6, 2**31 - 1, 2, -(2**31)], device="cuda", dtype=torch.int32)
def hostile_pool(max_seqlen=8):
    out = torch.empty_like(inp["v"])
    flash_kda.fwd(*args(inp), out, *gates, initial_state=pool, final_state=pool, cu_seqlens=cu, state_indices=hostile,
                  has_initial_state=torch.tensor([True, False, True, False, True], device="cuda"),
                  max_seqlen=max_seqlen)
    flash_kda.fwd(*args(inp), out, *gates, initial_state=pool, final_state=pool, cu_seqlens=cu,
                  state_indices=hostile.long() * (2**32), max_seqlen=max_seqlen)


hostile_pool(None)
decode_shapes(hostile_pool)

# one-token steps (a hint of 1, longer sequences among them) on bf16 pools with hostile slots: slots 16-byte
# aligned (the streamed build's 16-byte row copies), and every other one 8 bytes past (its 8-byte copies)
for pad in (40, 36):
    bf16_pool = torch.randn(6, H * 128 * 128 + pad, device="cuda").bfloat16()[:, :H * 128 * 128].view(6, H, 128, 128)
    def hostile_one_token(bf16_pool=bf16_pool):
        flash_kda.fwd(*args(inp), torch.empty_like(inp["v"]), *gates, initial_state=bf16_pool, final_state=bf16_pool,
                      cu_seqlens=cu, state_indices=hostile, max_seqlen=1)
    decode_shapes(hostile_one_token)

# per-token states: negative, past-the-end slots; num_accepted_tokens 0 and past T_max
verify = make_inputs(1, 12, H, seed=6)
vcu = torch.tensor([0, 4, 4, 7, 12, 12], device="cuda")
slots2d = torch.tensor([[0, 1, -1, 6], [2, 3, 4, 5], [-7, 9, 1, 0], [5, 4, 3, 2], [1, 1, 1, 1]], device="cuda")
def hostile_verify():
    for accepted in (None, torch.tensor([0, 5, 1, 4, -3], device="cuda", dtype=torch.int32)):
        flash_kda.fwd(*args(verify), torch.empty_like(verify["v"]), *gates, initial_state=pool, final_state=pool,
                      cu_seqlens=vcu, state_indices=slots2d, num_accepted_tokens=accepted, max_seqlen=5)


decode_shapes(hostile_verify)

# checkpoints with hostile offsets
offsets = torch.tensor([[-16, 16, 10**9], [16, 0, 3], [2**40, 16, -1], [48, 32, 64], [16, 64, 80]], device="cuda")
ckpt = torch.empty(5, 3, H, 128, 128, device="cuda")
flash_kda.fwd(*args(inp), torch.empty_like(inp["v"]), *gates, initial_state=h0, final_state=final, cu_seqlens=cu,
              checkpoint_offsets=offsets, checkpoint_state=ckpt)

# strided inputs (a fused projection) on both kernels
fused = torch.randn(1, 165, H, 3 * 128, device="cuda").bfloat16()
strided = dict(inp, q=fused[..., :128], k=fused[..., 128:256], v=fused[..., 256:])
def strided_call(max_seqlen=15):
    flash_kda.fwd(*args(strided), torch.empty_like(inp["v"]), *gates, initial_state=h0, final_state=h0,
                  cu_seqlens=cu, max_seqlen=max_seqlen)


strided_call(None)
decode_shapes(strided_call)
torch.cuda.synchronize()
print("sanitize case ran")
