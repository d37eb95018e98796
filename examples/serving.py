"""Serving KDA the way an inference engine does: one state pool addressed by slot.

1. prefill two new requests into pool slots (has_initial_state=False: the slots may hold stale states);
2. decode steps: one token per request, reading and writing the pool in place (CUDA-graph friendly);
3. speculative verify: 3 draft tokens per request, the state after every token kept in its own slot;
   the next step starts from the slot of the last accepted token (num_accepted_tokens);
4. a prefix checkpoint taken during a prefill, then resumed by a new request that shares the prefix.

Each step is checked against the float64 token recurrence. Needs a GPU flash_kda supports (python -m flash_kda info).
Usage: python examples/serving.py"""
from __future__ import annotations

import torch

import flash_kda
from flash_kda.jit.arch import arch_for_capability
from flash_kda.reference import kda_reference

H, K = 4, 128
SCALE = K ** -0.5


def tokens(n: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16)  # noqa: E731
    return dict(q=rand(1, n, H, K), k=rand(1, n, H, K), v=rand(1, n, H, K), g=rand(1, n, H, K), beta=rand(1, n, H))


def run(x: dict, **kw) -> torch.Tensor:
    out = torch.empty_like(x["v"])
    flash_kda.fwd(x["q"], x["k"], x["v"], x["g"], x["beta"], SCALE, out, A_LOG, DT_BIAS, -5.0, **kw)
    return out


def reference(x: dict, initial: torch.Tensor, cu: torch.Tensor, token_states=None):
    return kda_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], SCALE, A_LOG, DT_BIAS, -5.0,
                         initial_state=initial, cu_seqlens=cu, token_states=token_states)


ERRORS: list[float] = []


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error against the float64 reference (also kept for the final verdict)."""
    error = float((x.double() - ref).norm() / ref.norm())
    ERRORS.append(error)
    return error


def main() -> None:
    slots = 16
    pool = torch.randn(slots, H, K, K, device="cuda")  # stale states from earlier requests
    requests = torch.tensor([5, 11], device="cuda", dtype=torch.int32)  # the slots of the two requests

    # 1. prefill: 300 and 170 tokens, both new requests
    prompt, cu = tokens(470, seed=1), torch.tensor([0, 300, 470], device="cuda", dtype=torch.int32)
    out = run(prompt, initial_state=pool, final_state=pool, cu_seqlens=cu, state_indices=requests,
              has_initial_state=torch.tensor([False, False], device="cuda"))
    ref_out, ref_state = reference(prompt, torch.zeros(2, H, K, K, device="cuda"), cu)
    print(f"prefill:  out error {rel(out, ref_out):.2e}, pool error {rel(pool[requests.long()], ref_state):.2e}")

    # 2. decode: 4 steps of one token per request (varlen, max_seqlen=1 picks the decode kernel)
    one_each = torch.tensor([0, 1, 2], device="cuda", dtype=torch.int32)
    for step in range(4):
        x = tokens(2, seed=10 + step)
        out = run(x, initial_state=pool, final_state=pool, cu_seqlens=one_each, state_indices=requests, max_seqlen=1)
        ref_out, ref_state = reference(x, ref_state, one_each)
    print(f"decode:   out error {rel(out, ref_out):.2e}, pool error {rel(pool[requests.long()], ref_state):.2e}")

    # 3. verify 3 draft tokens per request; the state after each goes to its own slot
    drafts = torch.tensor([[5, 0, 1], [11, 2, 3]], device="cuda", dtype=torch.int32)  # column 0: the current slot
    x, three_each = tokens(6, seed=20), torch.tensor([0, 3, 6], device="cuda", dtype=torch.int32)
    out = run(x, initial_state=pool, final_state=pool, cu_seqlens=three_each, state_indices=drafts,
              num_accepted_tokens=torch.tensor([1, 1], device="cuda", dtype=torch.int32), max_seqlen=3)
    after: list = []
    ref_out, _ = reference(x, ref_state, three_each, token_states=after)
    accepted = [2, 3]  # request 0 accepts 2 drafts, request 1 all 3
    error = max(rel(pool[int(drafts[i, j])], after[j][i]) for i in range(2) for j in range(3))
    print(f"verify:   out error {rel(out, ref_out):.2e}, worst per-token state error {error:.2e}")
    # the next step starts from the slot of each request's last accepted token
    x = tokens(2, seed=21)
    run(x, initial_state=pool, final_state=pool, cu_seqlens=one_each, state_indices=drafts, max_seqlen=1,
        num_accepted_tokens=torch.tensor(accepted, device="cuda", dtype=torch.int32))
    start = torch.stack([after[accepted[i] - 1][i] for i in range(2)])
    steps: list = []
    reference(x, start, one_each, token_states=steps)
    print(f"resume:   state error {max(rel(pool[int(drafts[i, 0])], steps[0][i]) for i in range(2)):.2e}")

    # 4. a checkpoint after the first 256 tokens of a prompt, resumed by a request with that prefix
    prompt = tokens(400, seed=30)
    whole = torch.tensor([0, 400], device="cuda", dtype=torch.int32)
    ckpt = torch.empty(1, 1, H, K, K, device="cuda")
    run(prompt, final_state=torch.empty(1, H, K, K, device="cuda"), cu_seqlens=whole,
        checkpoint_offsets=torch.tensor([[256]], device="cuda"), checkpoint_state=ckpt)
    suffix = {name: t[:, 256:].contiguous() for name, t in prompt.items()}
    resumed = torch.empty(1, H, K, K, device="cuda")
    out = run(suffix, initial_state=ckpt[:, 0], final_state=resumed)
    ref_out, ref_state = reference(prompt, None, whole)
    print(f"resume from checkpoint: out error {rel(out, ref_out[:, 256:]):.2e}, state error "
          f"{rel(resumed, ref_state):.2e}")


if __name__ == "__main__":
    if not (torch.cuda.is_available() and arch_for_capability(*torch.cuda.get_device_capability()) is not None):
        # like the other GPU examples: say so and exit 0 (nothing failed)
        print("needs a CUDA GPU (compute capability 8.0 or later: python -m flash_kda info)")
        raise SystemExit(0)
    gen = torch.Generator().manual_seed(0)
    A_LOG = torch.rand(H, generator=gen).cuda()
    DT_BIAS = torch.rand(H, K, generator=gen).cuda()
    main()
    print("OK" if max(ERRORS) < 5e-3 else "FAILED")
    raise SystemExit(0 if max(ERRORS) < 5e-3 else 1)
