"""``flash_kda::fwd`` as a torch.library custom op, so torch.compile traces it without graph breaks.

The op mutates ``out`` and ``final_state`` and returns nothing; its fake implementation has
nothing to compute. Eager ``flash_kda.fwd`` calls the kernel directly (no dispatcher cost) and
routes through this op only while torch.compile is tracing.
"""
# no `from __future__ import annotations`: torch.library reads these annotations as types
from typing import Optional

import torch

from .api import fwd_eager


@torch.library.custom_op("flash_kda::fwd", mutates_args=("out", "final_state"))
def fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
           out: torch.Tensor, A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
           lower_bound: Optional[float], initial_state: Optional[torch.Tensor], final_state: Optional[torch.Tensor],
           cu_seqlens: Optional[torch.Tensor], check_cu_seqlens: Optional[bool] = None,
           v_block: Optional[int] = None) -> None:
    fwd_eager(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state, cu_seqlens,
              check_cu_seqlens=check_cu_seqlens, v_block=v_block)


@fwd_op.register_fake
def _fwd_fake(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
              cu_seqlens, check_cu_seqlens=None, v_block=None) -> None:
    return None
