"""One flash_kda call (T2048 H96, fp32 state) for ncu; run under ncu -k flash_kda_fwd_kernel."""
import torch

import flash_kda
from kda_inputs import make_inputs

inp = make_inputs(1, 2048, 96, seed=0)
h0 = torch.randn(1, 96, 128, 128, device="cuda")
out = torch.empty_like(inp["v"])
for _ in range(3):
    flash_kda.fwd(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.088, out, inp["A_log"], inp["dt_bias"],
                  -5.0, initial_state=h0, final_state=h0, v_block=128)
torch.cuda.synchronize()
