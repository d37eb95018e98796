"""Varlen batching: pack sequences of different lengths along T and describe them with cu_seqlens."""
import torch

import flash_kda


def main() -> None:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (compute capability 8.0 or later: python -m flash_kda info)")
        return
    lengths = [300, 17, 0, 1024, 5]               # an empty sequence is fine
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    T, H = int(cu[-1]), 8
    q, k, g = (torch.randn(1, T, H, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    v = torch.randn(1, T, H, 128, device="cuda", dtype=torch.bfloat16)
    beta = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
    A_log, dt_bias = torch.rand(H, device="cuda"), torch.rand(H, 128, device="cuda")
    out, states = flash_kda.kda(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, lower_bound=-5.0,
                                output_final_state=True, cu_seqlens=cu)
    print(f"{len(lengths)} sequences, {T} tokens: out {tuple(out.shape)}, one state per sequence "
          f"{tuple(states.shape)}; empty sequence's state is zero: {bool((states[2] == 0).all())}")


if __name__ == "__main__":
    main()
