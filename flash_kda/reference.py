"""float64 reference of the KDA forward: the token recurrence of docs/algorithm.md, section 1.

Slow and simple on purpose; runs on CPU or GPU. Sequences are processed together
(padded, masked) so that tests with many heads or sequences stay fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kda_gate(g: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
             lower_bound: float | None) -> torch.Tensor:
    """Per-channel log decay gamma (float64, <= 0) for raw gate logits g of shape [..., H, K]."""
    H, K = g.shape[-2], g.shape[-1]
    g = g.double()
    a = torch.exp(A_log.double()).view(H, 1) if A_log is not None else 1.0
    d = dt_bias.double().reshape(H, K) if dt_bias is not None else 0.0
    x = g + d
    if lower_bound is None:
        return -a * F.softplus(x)
    return lower_bound * torch.sigmoid(a * x)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def sequence_bounds(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, first token, end token) per sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


@torch.no_grad()
def kda_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  scale: float, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
                  lower_bound: float | None, initial_state: torch.Tensor | None = None,
                  cu_seqlens: torch.Tensor | None = None, token_states: list | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, T, H, V], final_state [N, H, V, K]) in float64, by the token recurrence.

    ``token_states``, when a list, receives the state after every token: entry j is [N, H, V, K]
    (the state after token j of each sequence, or its final state if it is shorter)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    qn, kn = l2_normalize(q), l2_normalize(k)
    vv = v.double()
    bt = torch.sigmoid(beta.double())
    alpha = torch.exp(kda_gate(g, A_log, dt_bias, lower_bound))

    seqs = sequence_bounds(B, T, cu_seqlens)
    N = len(seqs)
    S = torch.zeros(N, H, V, K, dtype=torch.float64, device=dev)
    if initial_state is not None:
        S = initial_state.double().clone()
    out = torch.zeros(B, T, H, V, dtype=torch.float64, device=dev)
    if N == 0:
        return out, S
    lengths = torch.tensor([e - s for _, s, e in seqs], device=dev)
    rows = torch.tensor([b for b, _, _ in seqs], device=dev)
    starts = torch.tensor([s for _, s, _ in seqs], device=dev)
    for j in range(int(lengths.max().item()) if N else 0):
        live = j < lengths                                  # [N]
        t = torch.where(live, starts + j, torch.zeros_like(starts))
        a_t, k_t, q_t = alpha[rows, t], kn[rows, t], qn[rows, t]   # [N, H, K]
        v_t, b_t = vv[rows, t], bt[rows, t]                  # [N, H, V], [N, H]
        S_dec = S * a_t[:, :, None, :]
        pred = torch.einsum("nhvk,nhk->nhv", S_dec, k_t)
        S_new = S_dec + b_t[..., None, None] * torch.einsum("nhv,nhk->nhvk", v_t - pred, k_t)
        S = torch.where(live[:, None, None, None], S_new, S)
        if token_states is not None:
            token_states.append(S.clone())
        o = scale * torch.einsum("nhvk,nhk->nhv", S, q_t)
        idx = live.nonzero().squeeze(1)
        out[rows[idx], t[idx]] = o[idx]
    return out, S
