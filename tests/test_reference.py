"""The float64 reference against an independent chunked float64 computation (docs/algorithm.md, section 2)."""
from __future__ import annotations

import pytest
import torch

from flash_kda.reference import kda_gate, kda_reference, l2_normalize, sequence_bounds

from kda_inputs import make_inputs


def chunked_kda(q, k, v, g, beta, scale, A_log, dt_bias, lower_bound, initial_state=None, cu_seqlens=None,
                chunk=16):
    """docs/algorithm.md section 2 in float64: per chunk, U = (I + L)^-1 diag(beta) (V - Kd S^T), O = Qd S^T + M U."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    qn, kn, vv = l2_normalize(q), l2_normalize(k), v.double()
    bt = torch.sigmoid(beta.double())
    gamma = kda_gate(g, A_log, dt_bias, lower_bound)
    seqs = sequence_bounds(B, T, cu_seqlens)
    out = torch.zeros(B, T, H, V, dtype=torch.float64)
    finals = []
    for n, (b, s, e) in enumerate(seqs):
        S = initial_state[n].double().clone() if initial_state is not None else torch.zeros(H, V, K,
                                                                                              dtype=torch.float64)
        for c0 in range(s, e, chunk):
            c1 = min(c0 + chunk, e)
            G = gamma[b, c0:c1].cumsum(0).permute(1, 0, 2)            # [H, C, K]
            kc, qc = kn[b, c0:c1].permute(1, 0, 2), qn[b, c0:c1].permute(1, 0, 2)
            vc, bc = vv[b, c0:c1].permute(1, 0, 2), bt[b, c0:c1].permute(1, 0)
            kd, ki = kc * G.exp(), kc * (-G).exp()
            qd = scale * qc * G.exp()
            kr = kc * (G[:, -1:] - G).exp()
            C = c1 - c0
            Lmat = torch.tril(bc[:, :, None] * kd @ ki.transpose(1, 2), -1)
            M = torch.tril(qd @ ki.transpose(1, 2))
            rhs = bc[:, :, None] * (vc - kd @ S.transpose(1, 2))
            U = torch.linalg.solve_triangular(torch.eye(C, dtype=torch.float64) + Lmat, rhs, upper=False,
                                              unitriangular=True)
            O = qd @ S.transpose(1, 2) + M @ U
            out[b, c0:c1] = O.permute(1, 0, 2)
            S = S * G[:, -1].exp()[:, None, :] + U.transpose(1, 2) @ kr
        finals.append(S)
    return out, torch.stack(finals) if finals else torch.zeros(0, H, V, K, dtype=torch.float64)


@pytest.mark.parametrize("lower_bound", [-5.0, -1.0, None])
@pytest.mark.parametrize("with_state", [False, True])
def test_reference_matches_chunked_form_fixed(lower_bound, with_state):
    inp = make_inputs(2, 37, 3, device="cpu", seed=3, K=16, V=8)
    h0 = torch.randn(2, 3, 8, 16, dtype=torch.float64) if with_state else None
    args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.25, inp["A_log"], inp["dt_bias"], lower_bound)
    out, state = kda_reference(*args, initial_state=h0)
    out_c, state_c = chunked_kda(*args, initial_state=h0)
    torch.testing.assert_close(out, out_c, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(state, state_c, rtol=1e-9, atol=1e-10)


def test_reference_matches_chunked_form_varlen():
    cu = torch.tensor([0, 5, 5, 21, 40])
    inp = make_inputs(1, 40, 2, device="cpu", seed=4, K=16, V=8, A_log=False)
    h0 = torch.randn(4, 2, 8, 16, dtype=torch.float64)
    args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.3, inp["A_log"], inp["dt_bias"], -5.0)
    out, state = kda_reference(*args, initial_state=h0, cu_seqlens=cu)
    out_c, state_c = chunked_kda(*args, initial_state=h0, cu_seqlens=cu)
    torch.testing.assert_close(out, out_c, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(state, state_c, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(state[1], h0[1])  # the empty sequence keeps its state


def test_reference_single_token_by_hand():
    """One token, zero state: S = beta v k^T, o = scale * beta (k^ . q^) v."""
    inp = make_inputs(1, 1, 1, device="cpu", seed=5, K=4, V=3)
    out, state = kda_reference(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.5, None, None, -5.0)
    qn, kn = l2_normalize(inp["q"])[0, 0, 0], l2_normalize(inp["k"])[0, 0, 0]
    b = torch.sigmoid(inp["beta"].double())[0, 0, 0]
    v = inp["v"].double()[0, 0, 0]
    torch.testing.assert_close(state[0, 0], b * torch.outer(v, kn))
    torch.testing.assert_close(out[0, 0, 0], 0.5 * b * (kn @ qn) * v)


def test_gates():
    g = torch.randn(2, 3, 4)
    A_log, dt = torch.rand(3), torch.rand(3, 4)
    a = A_log.double().exp()[:, None]
    torch.testing.assert_close(kda_gate(g, A_log, dt, -5.0), -5.0 * torch.sigmoid(a * (g.double() + dt.double())))
    torch.testing.assert_close(kda_gate(g, A_log, dt, None),
                               -a * torch.nn.functional.softplus(g.double() + dt.double()))
    torch.testing.assert_close(kda_gate(g, None, None, -2.0), -2.0 * torch.sigmoid(g.double()))
