"""Input checks for ``flash_kda.fwd``: every rule of SPEC section 4, before any compile or launch.

Errors name the argument, what was expected and what was received. ``fast_check`` is the
per-call hot path: one pass of cheap comparisons that accepts the common case (every input
valid, contiguous and of the exact types the launch packs); anything else goes to
``check_inputs``, which raises the precise error or accepts an input that only needs
normalising (a non-contiguous input, an int scale, ...).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

HEAD_DIM = 128
LOWER_BOUND_RANGE = (-5.0, 0.0)
FLOAT32_MAX = 3.4028234663852886e38  # scale is passed to the kernel as a float32
_STATE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
_BF16, _FP32, _INT32, _INT64 = torch.bfloat16, torch.float32, torch.int32, torch.int64
_LB_LO, _LB_HI = LOWER_BOUND_RANGE


def _env_enabled(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


# read once at import (a per-call environment lookup costs about a microsecond of host time)
CHECK_CU_SEQLENS: bool = _env_enabled("FLASH_KDA_CHECK_CU_SEQLENS")


@dataclass
class Problem:
    """What the kernel launch needs to know, derived from validated inputs."""

    num_seqs: int
    seq_len: int
    total_tokens: int
    num_heads: int
    device_index: int
    state_in: str
    state_out: str
    varlen: bool


def _fail(cls, arg: str, expected: str, got) -> None:
    raise cls(f"flash_kda.fwd: {arg} must be {expected}, got {got}")


def _check_tensor(name: str, x, dtype, shape: tuple[int, ...], device_index: int) -> None:
    # hot path: torch.Size == tuple, dtype identity and get_device() are the cheap comparisons
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor", type(x).__name__)
    if x.dtype is not dtype:
        _fail(TypeError, name, f"of dtype {dtype}", x.dtype)
    if x.shape != shape:
        _fail(ValueError, name, f"of shape {list(shape)}", list(x.shape))
    if x.get_device() != device_index:
        _fail(ValueError, name, f"on the device of q ({_device_name(device_index)})", x.device)


def _device_name(index: int) -> str:
    return "cpu" if index < 0 else f"cuda:{index}"


def check_lower_bound(lower_bound) -> float:
    if lower_bound is None:
        raise NotImplementedError(
            "flash_kda.fwd: lower_bound=None selects the softplus gate, which this version does not implement "
            f"yet; pass a bounded-gate lower_bound in [{LOWER_BOUND_RANGE[0]}, {LOWER_BOUND_RANGE[1]}]")
    lb = float(lower_bound)
    if not (LOWER_BOUND_RANGE[0] <= lb <= LOWER_BOUND_RANGE[1]):
        raise ValueError(
            f"flash_kda.fwd: lower_bound must lie in [{LOWER_BOUND_RANGE[0]}, {LOWER_BOUND_RANGE[1]}], got {lb}: "
            "the chunked kernel factorises the decay as e^(+G) e^(-G) over 16-token chunks, and |G| <= 16*5 = 80 "
            "nats is what stays a normal number in fp32/bf16")
    return lb


def check_inputs(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
                 cu_seqlens) -> Problem:
    if not isinstance(q, torch.Tensor):
        _fail(TypeError, "q", "a torch.Tensor", type(q).__name__)
    if q.dim() != 4:
        _fail(ValueError, "q", "4-D [B, T, H, K]", f"{q.dim()}-D shape {list(q.shape)}")
    dev = q.get_device()  # -1 on CPU
    B, T, H, K = q.shape
    if K != HEAD_DIM:
        _fail(ValueError, "q", f"head dim K = {HEAD_DIM} (the only one implemented)", f"K = {K}")
    if not isinstance(v, torch.Tensor):
        _fail(TypeError, "v", "a torch.Tensor", type(v).__name__)
    if v.dim() != 4 or v.shape[-1] != HEAD_DIM:
        _fail(ValueError, "v", f"4-D [B, T, H, V] with V = {HEAD_DIM}", list(v.shape))
    _check_tensor("q", q, torch.bfloat16, (B, T, H, K), dev)
    _check_tensor("k", k, torch.bfloat16, (B, T, H, K), dev)
    _check_tensor("v", v, torch.bfloat16, (B, T, H, HEAD_DIM), dev)
    _check_tensor("g", g, torch.bfloat16, (B, T, H, K), dev)
    _check_tensor("beta", beta, torch.bfloat16, (B, T, H), dev)
    _check_tensor("out", out, torch.bfloat16, (B, T, H, HEAD_DIM), dev)
    if not out.is_contiguous():
        _fail(ValueError, "out", "contiguous (it is written in place)", f"strides {out.stride()}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail(TypeError, "scale", "a finite float", repr(scale))
    if abs(scale) > FLOAT32_MAX:
        _fail(ValueError, "scale", f"within the float32 range (|scale| <= {FLOAT32_MAX:.7g})", repr(scale))
    if A_log is not None:
        _check_tensor("A_log", A_log, torch.float32, (H,), dev)
    if dt_bias is not None:
        if not isinstance(dt_bias, torch.Tensor):
            _fail(TypeError, "dt_bias", "a torch.Tensor or None", type(dt_bias).__name__)
        expected = (H, K) if dt_bias.dim() == 2 else (H * K,)
        _check_tensor("dt_bias", dt_bias, torch.float32, expected, dev)
    check_lower_bound(lower_bound)

    varlen = cu_seqlens is not None
    if varlen:
        if not isinstance(cu_seqlens, torch.Tensor):
            _fail(TypeError, "cu_seqlens", "a torch.Tensor or None", type(cu_seqlens).__name__)
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            _fail(TypeError, "cu_seqlens", "int32 or int64", cu_seqlens.dtype)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            _fail(ValueError, "cu_seqlens", "1-D [N + 1] with N >= 0", list(cu_seqlens.shape))
        if cu_seqlens.get_device() != dev:
            _fail(ValueError, "cu_seqlens", f"on the device of q ({_device_name(dev)})", cu_seqlens.device)
        if B != 1:
            _fail(ValueError, "q", "batch size 1 when cu_seqlens is given (varlen packs sequences along T)",
                  f"B = {B}")
        N = cu_seqlens.numel() - 1
    else:
        N = B

    state_names = []
    for name, state in (("initial_state", initial_state), ("final_state", final_state)):
        if state is None:
            state_names.append("none")
            continue
        if not isinstance(state, torch.Tensor):
            _fail(TypeError, name, "a torch.Tensor or None", type(state).__name__)
        if state.dtype not in _STATE_NAMES:
            _fail(TypeError, name, "bfloat16 or float32", state.dtype)
        _check_tensor(name, state, state.dtype, (N, H, HEAD_DIM, K), dev)
        if not state.is_contiguous():
            _fail(ValueError, name, "contiguous [N, H, V, K]", f"strides {state.stride()}")
        state_names.append(_STATE_NAMES[state.dtype])
    if dev < 0:
        _fail(ValueError, "q", "a CUDA tensor", f"a tensor on {q.device}")
    return Problem(num_seqs=N, seq_len=T, total_tokens=B * T, num_heads=H, device_index=dev, state_in=state_names[0],
                   state_out=state_names[1], varlen=varlen)


def fast_check(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
               cu_seqlens) -> tuple[int, int, int, int, int, str, str] | None:
    """The common case of ``check_inputs`` in one pass of cheap comparisons (dtype identity,
    torch.Size == tuple, get_device, is_contiguous), without building error messages.

    Returns (device index, N, T, H, total tokens B*T, state_in, state_out) when every rule of
    ``check_inputs`` holds AND every tensor is contiguous, ``scale`` and ``lower_bound`` are
    Python floats and ``scale`` fits float32. Returns None otherwise: then ``check_inputs`` must run, to raise
    the precise error or to accept an input that only needs normalising. It never raises for
    bad input itself (wrong types and ranks land in the ``except``).
    """
    try:
        shape = q.shape
        B, T, H, K = shape
        dev = q.get_device()  # -1 on CPU
        if not (dev >= 0 and K == HEAD_DIM
                and q.dtype is _BF16 and k.dtype is _BF16 and v.dtype is _BF16 and g.dtype is _BF16
                and beta.dtype is _BF16 and out.dtype is _BF16
                and k.shape == shape and v.shape == shape and g.shape == shape and out.shape == shape
                and beta.shape == (B, T, H)
                and k.get_device() == dev and v.get_device() == dev and g.get_device() == dev
                and beta.get_device() == dev and out.get_device() == dev
                and q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and g.is_contiguous()
                and beta.is_contiguous() and out.is_contiguous()
                and type(scale) is float and -FLOAT32_MAX <= scale <= FLOAT32_MAX
                and type(lower_bound) is float and _LB_LO <= lower_bound <= _LB_HI):
            return None
        if A_log is not None and not (A_log.dtype is _FP32 and A_log.shape == (H,) and A_log.get_device() == dev
                                      and A_log.is_contiguous()):
            return None
        if dt_bias is not None and not (dt_bias.dtype is _FP32 and dt_bias.get_device() == dev
                                        and (dt_bias.shape == (H, K) or dt_bias.shape == (H * K,))
                                        and dt_bias.is_contiguous()):
            return None
        if cu_seqlens is None:
            N = B
        else:
            if not (B == 1 and (cu_seqlens.dtype is _INT64 or cu_seqlens.dtype is _INT32)
                    and cu_seqlens.dim() == 1 and cu_seqlens.get_device() == dev and cu_seqlens.is_contiguous()):
                return None
            N = cu_seqlens.shape[0] - 1
            if N < 0:
                return None
        if initial_state is None:
            state_in = "none"
        else:
            state_in = _STATE_NAMES.get(initial_state.dtype)
            if not (state_in is not None and initial_state.shape == (N, H, HEAD_DIM, K)
                    and initial_state.get_device() == dev and initial_state.is_contiguous()):
                return None
        if final_state is None:
            state_out = "none"
        elif final_state is initial_state:
            state_out = state_in
        else:
            state_out = _STATE_NAMES.get(final_state.dtype)
            if not (state_out is not None and final_state.shape == (N, H, HEAD_DIM, K)
                    and final_state.get_device() == dev and final_state.is_contiguous()):
                return None
    except (AttributeError, TypeError, ValueError):  # not a tensor, wrong rank, ...: check_inputs names it
        return None
    return dev, N, T, H, B * T, state_in, state_out


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> None:
    """Opt-in value check (costs a device->host sync): 0 <= cu[0] <= ... <= cu[N] <= total tokens."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu.numel() == 0:
        return
    if int(cu[0]) < 0:
        raise ValueError(f"flash_kda.fwd: cu_seqlens[0] must be >= 0, got {int(cu[0])}")
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()):
        i = int((steps < 0).nonzero()[0])
        raise ValueError(f"flash_kda.fwd: cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {int(cu[i])} > "
                         f"cu_seqlens[{i + 1}] = {int(cu[i + 1])}")
    if int(cu[-1]) > total_tokens:
        raise ValueError(f"flash_kda.fwd: cu_seqlens[-1] must be <= T = {total_tokens}, got {int(cu[-1])}")


def cu_seqlens_check_enabled() -> bool:
    """FLASH_KDA_CHECK_CU_SEQLENS as read at import."""
    return CHECK_CU_SEQLENS
