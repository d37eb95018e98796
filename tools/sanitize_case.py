"""A varlen call with state, an empty sequence and a length-1 sequence, for compute-sanitizer."""
import torch

import flash_kda
from kda_inputs import make_inputs

cu = torch.tensor([0, 37, 37, 38, 100, 165], device="cuda", dtype=torch.int32)
inp = make_inputs(1, 165, 3, seed=5)
h0 = torch.randn(5, 3, 128, 128, device="cuda")
for vb in (32, 64, 128):
    out = torch.empty_like(inp["v"])
    final = torch.empty(5, 3, 128, 128, device="cuda", dtype=torch.bfloat16)
    flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.088, out, inp["A_log"], inp["dt_bias"],
                  -5.0, initial_state=h0, final_state=final, cu_seqlens=cu, v_block=vb)
    flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.088, out, inp["A_log"], inp["dt_bias"],
                  -5.0, initial_state=h0, final_state=h0, cu_seqlens=cu.long(), v_block=vb)  # in place
torch.cuda.synchronize()
print("sanitize case ran")
