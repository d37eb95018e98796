"""FLA picks flash_kda up by itself: chunk_kda under torch.inference_mode() dispatches to flash_kda.fwd."""
import logging

import torch


def main() -> None:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (compute capability 8.0 or later: python -m flash_kda info) and fla-core")
        return
    from fla.ops.kda import chunk_kda
    logging.basicConfig(level=logging.INFO)  # FLA logs "[FLA Backend] ... -> flash_kda"
    B, T, H = 2, 512, 8
    q, k, g = (torch.randn(B, T, H, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    v = torch.randn(B, T, H, 128, device="cuda", dtype=torch.bfloat16)
    beta = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16)
    A_log, dt_bias = torch.rand(H, device="cuda"), torch.rand(H * 128, device="cuda")
    with torch.inference_mode():
        out, state = chunk_kda(q, k, v, g, beta, initial_state=torch.zeros(B, H, 128, 128, device="cuda"),
                               output_final_state=True, use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True,
                               use_beta_sigmoid_in_kernel=True, safe_gate=True, lower_bound=-5.0,
                               state_v_first=True, A_log=A_log, dt_bias=dt_bias)
    print(f"out {tuple(out.shape)}, final state {tuple(state.shape)}")


if __name__ == "__main__":
    main()
