"""``flash_kda::fwd`` as a torch.library custom op, so torch.compile traces it without graph breaks.
A copy an engine vendors under another name registers ``<its name, "." as "_">::fwd`` instead
(``api.OP_NAMESPACE``): a second registration of one name silently replaces the first, and the
compiled calls of both copies would run the copy imported last.

The op mutates ``out``, ``final_state`` and ``checkpoint_state`` and returns nothing; its fake
implementation has nothing to compute. ``fwd`` passes an empty 1-D tensor for a mutated argument
that is None (torch 2.11 cannot trace a None there); the implementation maps it back.

Eager ``flash_kda.fwd`` calls the kernel directly (no dispatcher cost) and routes through this op
only while torch.compile is tracing; the op's implementation runs when the compiled graph does
(not while tracing), so it calls ``fwd``.
"""
# no `from __future__ import annotations`: torch.library reads these annotations as types
from typing import Optional

import torch

from .api import OP_NAMESPACE, fwd


@torch.library.custom_op(f"{OP_NAMESPACE}::fwd", mutates_args=("out", "final_state", "checkpoint_state"))
def fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
           out: torch.Tensor, A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
           lower_bound: Optional[float], initial_state: Optional[torch.Tensor], final_state: Optional[torch.Tensor],
           cu_seqlens: Optional[torch.Tensor], state_indices: Optional[torch.Tensor] = None,
           has_initial_state: Optional[torch.Tensor] = None, num_accepted_tokens: Optional[torch.Tensor] = None,
           max_seqlen: Optional[int] = None, checkpoint_offsets: Optional[torch.Tensor] = None,
           checkpoint_state: Optional[torch.Tensor] = None, check_cu_seqlens: Optional[bool] = None,
           check_indices: Optional[bool] = None, v_block: Optional[int] = None) -> None:
    final_state, checkpoint_state = _present(final_state), _present(checkpoint_state)
    fwd(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state, cu_seqlens,
        state_indices=state_indices, has_initial_state=has_initial_state, num_accepted_tokens=num_accepted_tokens,
        max_seqlen=max_seqlen, checkpoint_offsets=checkpoint_offsets, checkpoint_state=checkpoint_state,
        check_cu_seqlens=check_cu_seqlens, check_indices=check_indices, v_block=v_block)


def _present(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """None for the empty 1-D placeholder ``fwd`` passes instead of a None that is mutated (states and
    checkpoints are 4-D and 5-D, so a real argument never looks like it)."""
    return None if x is not None and x.dim() == 1 and x.numel() == 0 else x


@fwd_op.register_fake
def _fwd_fake(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state, cu_seqlens,
              state_indices=None, has_initial_state=None, num_accepted_tokens=None, max_seqlen=None,
              checkpoint_offsets=None, checkpoint_state=None, check_cu_seqlens=None, check_indices=None,
              v_block=None) -> None:
    return None
