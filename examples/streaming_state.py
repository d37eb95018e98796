"""Chunked prefill / multi-turn: carry the recurrent state between calls, updated in place.

Processing a sequence in pieces with the state carried equals processing it at once."""
import torch

import flash_kda


def main() -> None:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (compute capability 8.0 or later: python -m flash_kda info)")
        return
    T, H = 1000, 4
    q, k, g = (torch.randn(1, T, H, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    v = torch.randn(1, T, H, 128, device="cuda", dtype=torch.bfloat16)
    beta = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
    A_log, dt_bias = torch.rand(H, device="cuda"), torch.rand(H, 128, device="cuda")
    scale = 128 ** -0.5

    whole = torch.empty_like(v)
    flash_kda.fwd(q, k, v, g, beta, scale, whole, A_log, dt_bias, -5.0)

    state = torch.zeros(1, H, 128, 128, device="cuda")  # fp32 state, updated in place each turn
    pieces = []
    for start, end in [(0, 333), (333, 334), (334, 1000)]:
        sl = slice(start, end)
        out = torch.empty_like(v[:, sl])
        flash_kda.fwd(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], scale, out, A_log, dt_bias, -5.0,
                      initial_state=state, final_state=state)
        pieces.append(out)
    streamed = torch.cat(pieces, dim=1)
    err = float((streamed.float() - whole.float()).norm() / whole.float().norm())
    print(f"streamed in 3 turns vs one call: relative difference {err:.2e}")


if __name__ == "__main__":
    main()
