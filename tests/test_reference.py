"""The float64 reference against an independent chunked float64 computation (docs/algorithm.md, section 2)."""
from __future__ import annotations

import pytest
import torch

from flash_kda.reference import kda_gate, kda_reference, l2_normalize, sequence_bounds

from kda_inputs import make_inputs, rel_rms


def range_sums(gamma: torch.Tensor) -> torch.Tensor:
    """D[h, i, j] = sum of gamma_t over j < t <= i (0 when j >= i), for j = -1 .. C-1 stored at j + 1, from a
    chunk's per-token log decays gamma [H, C, K]. Every entry is a sum of same-sign terms, never a difference
    of cumulative sums: no cancellation whatever the gate (docs/algorithm.md)."""
    H, C, K = gamma.shape
    D = torch.zeros(H, C, C + 1, K, dtype=gamma.dtype)
    for i in range(C):
        # suffix sums of gamma_0 .. gamma_i: entry j + 1 = sum over j < t <= i
        D[:, i, :i + 1] = gamma[:, :i + 1].flip(1).cumsum(1).flip(1)
    return D


FORMS = ("factorised", "centred", "anchored")  # the chunked kernel's forms (kda_chunk_anchored.cuh)


def anchor_rows(C: int) -> torch.Tensor:
    """The anchored form's anchor a for each pair (i, j) of a chunk, as the kernel has it: a = 7 for pairs
    across the chunk's halves, the last row of j's quarter for pairs across the quarters of one half,
    a = j inside a quarter."""
    i, j = torch.arange(C)[:, None], torch.arange(C)[None, :]
    across_quarters = torch.where(i // 4 != j // 4, (j // 4 + 1) * 4 - 1, j)
    return torch.where(i // 8 != j // 8, 7, across_quarters).clamp(max=C - 1)


def decayed_pairs(left: torch.Tensor, right: torch.Tensor, gamma: torch.Tensor, form: str) -> torch.Tensor:
    """P[h, i, j] = sum_c left_i[c] right_j[c] e^(G_i[c] - G_j[c]) for j <= i, 0 above the diagonal
    (docs/algorithm.md, section 2), from the chunk's per-token log decays gamma [H, C, K], by one of the
    kernel's forms:
    factorised: (left * e^G) (right * e^-G)^T, G = cumsum(gamma) (the bounded gate's kernel);
    centred: every pair through row 7, (left * e^(G - G_7)) (right * e^(G_7 - G))^T, as the kernel
        computes it (differences of the cumulative sums; entries above the diagonal may overflow and
        are dropped);
    anchored: each pair through an anchor row a between them (anchor_rows),
        (left_i * e^(G_i - G_a)) . (right_j * e^(G_a - G_j)), every exponent a range sum of gamma (<= 0)."""
    if form == "factorised":
        G = gamma.cumsum(1)
        return torch.tril((left * G.exp()) @ (right * (-G).exp()).transpose(1, 2))
    C = gamma.shape[1]
    if form == "centred":
        G = gamma.cumsum(1)
        G7 = G[:, min(7, C - 1)].unsqueeze(1)
        return torch.tril((left * (G - G7).exp()) @ (right * (G7 - G).exp()).transpose(1, 2))
    D = range_sums(gamma)
    rows = torch.arange(C)
    i, j = rows[:, None], rows[None, :]
    anchor = anchor_rows(C)
    left_exp = D[:, i, anchor + 1]                                  # sum over a < t <= i   [H, C, C, K]
    right_exp = D[:, anchor, j + 1]                                 # sum over j < t <= a
    pairs = ((left[:, :, None] * left_exp.exp()) * (right[:, None] * right_exp.exp())).sum(-1)
    return torch.tril(pairs)


def chunked_kda(q, k, v, g, beta, scale, A_log, dt_bias, lower_bound, initial_state=None, cu_seqlens=None,
                chunk=16, form="factorised", dtype=torch.float64):
    """docs/algorithm.md section 2: per chunk, U = (I + L)^-1 diag(beta) (V - Kd S^T), O = Qd S^T + M U,
    in ``dtype``, with L and M by ``decayed_pairs(..., form)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    qn, kn, vv = l2_normalize(q).to(dtype), l2_normalize(k).to(dtype), v.to(dtype)
    bt = torch.sigmoid(beta.double()).to(dtype)
    gamma = kda_gate(g, A_log, dt_bias, lower_bound).to(dtype)
    seqs = sequence_bounds(B, T, cu_seqlens)
    out = torch.zeros(B, T, H, V, dtype=dtype)
    finals = []
    for n, (b, s, e) in enumerate(seqs):
        S = initial_state[n].to(dtype).clone() if initial_state is not None else torch.zeros(H, V, K, dtype=dtype)
        for c0 in range(s, e, chunk):
            c1 = min(c0 + chunk, e)
            gc = gamma[b, c0:c1].permute(1, 0, 2)                      # [H, C, K]
            G = gc.cumsum(1)                                           # a prefix sum: same-sign terms
            kc, qc = kn[b, c0:c1].permute(1, 0, 2), qn[b, c0:c1].permute(1, 0, 2)
            vc, bc = vv[b, c0:c1].permute(1, 0, 2), bt[b, c0:c1].permute(1, 0)
            kd, qd = kc * G.exp(), scale * qc * G.exp()                # exponents <= 0 for any gate
            # decay from row r to the chunk end: a suffix sum (the bounded kernel's G_{C-1} - G_r is the
            # same number up to rounding, which its |G| <= 80 keeps small)
            to_end = range_sums(gc)[:, -1, 1:] if form != "factorised" else G[:, -1:] - G
            kr = kc * to_end.exp()
            C = c1 - c0
            Lmat = bc[:, :, None] * decayed_pairs(kc, kc, gc, form).tril(-1)
            M = decayed_pairs(scale * qc, kc, gc, form)
            rhs = bc[:, :, None] * (vc - kd @ S.transpose(1, 2))
            U = torch.linalg.solve_triangular(torch.eye(C, dtype=dtype) + Lmat, rhs, upper=False,
                                              unitriangular=True)
            O = qd @ S.transpose(1, 2) + M @ U
            out[b, c0:c1] = O.permute(1, 0, 2)
            S = S * G[:, -1].exp()[:, None, :] + U.transpose(1, 2) @ kr
        finals.append(S)
    return out, torch.stack(finals) if finals else torch.zeros(0, H, V, K, dtype=dtype)


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


# The general gate (docs/algorithm.md, "The general gate: anchored pairs"): gate logits that drive the
# per-token log decay from about -1e-25 to -1200 nats, with A_log in {-3, 0, 3}.
def extreme_gate(kind: str, T: int, H: int, K: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    if kind == "normal":
        return torch.randn(1, T, H, K, generator=gen)
    if kind == "wide":
        return torch.randn(1, T, H, K, generator=gen) * 8
    if kind == "wipe":       # g + dt_bias = +60: decay e^{-a 60} per token, the state is wiped
        return torch.full((1, T, H, K), 60.0)
    if kind == "keep":       # g + dt_bias = -60: decay e^{-a 1e-26}, the state is kept
        return torch.full((1, T, H, K), -60.0)
    if kind == "channels":   # per channel, +60 and -60 in one chunk
        return torch.where(torch.arange(K) % 2 == 0, 60.0, -60.0).expand(1, T, H, K).clone()
    if kind == "tokens":     # alternating tokens
        return torch.where(torch.arange(T)[:, None, None] % 2 == 0, 60.0, -60.0).expand(1, T, H, K).clone()
    raise ValueError(kind)


GENERAL_GATES = [(kind, a, None) for kind in ("normal", "wide", "wipe", "keep", "channels", "tokens")
                 for a in (-3.0, 0.0, 3.0)] + [("normal", 0.0, lb) for lb in (-0.5, -5.0, -8.0, -30.0, -1e4)] \
                + [("wide", 3.0, -1e4)]


def general_gate_inputs(kind: str, a_log: float, T: int = 41, H: int = 2, K: int = 16, V: int = 8):
    inp = make_inputs(1, T, H, device="cpu", seed=6, K=K, V=V)
    inp["g"] = extreme_gate(kind, T, H, K).bfloat16()
    inp["A_log"] = torch.full((H,), a_log)
    inp["dt_bias"] = torch.zeros(H, K)
    return inp


@pytest.mark.parametrize("kind,a_log,lower_bound", GENERAL_GATES)
def test_anchored_pairs_are_exact_for_every_gate(kind, a_log, lower_bound):
    """In float64 the anchored chunked form equals the token recurrence for any finite gate."""
    inp = general_gate_inputs(kind, a_log)
    h0 = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.25, inp["A_log"], inp["dt_bias"], lower_bound)
    out, state = kda_reference(*args, initial_state=h0)
    out_a, state_a = chunked_kda(*args, initial_state=h0, form="anchored")
    torch.testing.assert_close(out_a, out, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(state_a, state, rtol=1e-9, atol=1e-10)


def deepest_decay(gamma: torch.Tensor, rows: int) -> float:
    """The most any run of `rows` tokens aligned like the kernel's chunks (or half chunks) decays one
    channel, in nats, from per-token log decays gamma [T, H, K]."""
    return max(float(-gamma[t:t + rows].sum(0).min()) for t in range(0, gamma.shape[0], rows))


@pytest.mark.parametrize("kind,a_log,lower_bound", GENERAL_GATES)
def test_chunk_forms_in_float32(kind, a_log, lower_bound):
    """The kernel's precision (fp32). The anchored form stays within 1e-6 of the float64 recurrence for
    every gate (measured worst 1.2e-7). The factorised form is as good while a chunk decays by less than
    80 nats in every channel, and not finite past 100; the centred form while each half of a chunk does:
    the limits by which the kernel's producers pick the form (choose_chunk_form)."""
    inp = general_gate_inputs(kind, a_log)
    h0 = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.25, inp["A_log"], inp["dt_bias"], lower_bound)
    out, state = kda_reference(*args, initial_state=h0)
    out_a, state_a = chunked_kda(*args, initial_state=h0, form="anchored", dtype=torch.float32)
    assert rel_rms(out_a, out) < 1e-6 and rel_rms(state_a, state) < 1e-6
    gamma = kda_gate(inp["g"], inp["A_log"], inp["dt_bias"], lower_bound)[0]   # [T, H, K]
    for form, rows in (("factorised", 16), ("centred", 8)):
        out_f, state_f = chunked_kda(*args, initial_state=h0, form=form, dtype=torch.float32)
        if deepest_decay(gamma, rows) < 80:
            assert rel_rms(out_f, out) < 1e-6 and rel_rms(state_f, state) < 1e-6, form
        elif deepest_decay(gamma, rows) > 100:
            assert not (torch.isfinite(out_f).all() and torch.isfinite(state_f).all()), form


def test_centred_form_covers_steady_decays_the_factorised_form_cannot():
    """About 7 nats per token: 112 per chunk (the factorised form overflows), 56 per half (the centred
    form holds), as the producers' vote assumes."""
    inp = general_gate_inputs("normal", 0.0, T=48)
    inp["g"] = torch.full_like(inp["g"], 7.0)   # softplus(7) ~ 7 nats per token
    h0 = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], 0.25, inp["A_log"], inp["dt_bias"], None)
    out, state = kda_reference(*args, initial_state=h0)
    out_s, state_s = chunked_kda(*args, initial_state=h0, form="centred", dtype=torch.float32)
    assert rel_rms(out_s, out) < 1e-6 and rel_rms(state_s, state) < 1e-6
    out_f, _ = chunked_kda(*args, initial_state=h0, form="factorised", dtype=torch.float32)
    assert not torch.isfinite(out_f).all()
