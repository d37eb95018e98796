"""Input checks for ``flash_kda.fwd``: every rule of docs/contract.md ("Bad input"), before any
compile or launch.

Errors name the entry point, the argument, what was expected and what was received. ``fast_check`` is the
per-call hot path: one pass of cheap comparisons that accepts the common case (every input
valid, contiguous and of the exact types the launch packs); anything else goes to
``check_inputs``, which raises the precise error or accepts an input that only needs
normalising (a non-contiguous input, an int scale, ...).
"""
from __future__ import annotations

import math
import numbers
import operator
import os
from dataclasses import dataclass

import torch

from .jit.spec import HEAD_DIM, V_BLOCKS

FWD = "flash_kda.fwd"  # the entry point errors name by default (flash_kda.kda passes its own)
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


def _fail(cls, arg: str, expected: str, got, where: str = FWD) -> None:
    raise cls(f"{where}: {arg} must be {expected}, got {got}")


_OPTIONAL = frozenset({"A_log", "dt_bias", "initial_state", "final_state", "cu_seqlens"})


def _check_dense(name: str, x, where: str) -> None:
    """A plain strided tensor: nested and sparse tensors have no data_ptr/strides the kernel could use."""
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor or None" if name in _OPTIONAL else "a torch.Tensor",
              type(x).__name__, where)
    if x.is_nested:
        _fail(TypeError, name, "a dense (strided) torch.Tensor", "a nested tensor", where)
    if x.layout is not torch.strided:
        _fail(TypeError, name, "a dense (strided) torch.Tensor", f"a tensor of layout {x.layout}", where)


def _check_tensor(name: str, x, dtype, shape: tuple[int, ...], where: str = FWD) -> None:
    # hot path: torch.Size == tuple and dtype identity are the cheap comparisons
    _check_dense(name, x, where)
    if x.dtype is not dtype:
        _fail(TypeError, name, f"of dtype {dtype}", x.dtype, where)
    if x.shape != shape:
        _fail(ValueError, name, f"of shape {list(shape)}", list(x.shape), where)


def _check_devices(tensors: dict, where: str) -> int:
    """Every tensor on one CUDA device (q's); names each one that is not. Returns that device's index."""
    devices = {name: _device_label(x) for name, x in tensors.items()}
    q_index = tensors["q"].get_device()
    if q_index >= 0:
        reference = devices["q"]
    else:  # q is not on a GPU: the first tensor that is sets the reference, if any
        reference = next((d for d in devices.values() if d.startswith("cuda")), None)
        if reference is None:
            _fail(ValueError, "q", "a CUDA tensor", f"a tensor on {devices['q']}", where)
    offenders = [(name, device) for name, device in devices.items() if device != reference]
    if offenders:
        names = ", ".join(name for name, _ in offenders)
        got = ", ".join(f"{name} on {device}" for name, device in offenders)
        if q_index >= 0:
            raise ValueError(f"{where}: {names} must be on the device of q ({reference}), got {got}")
        raise ValueError(f"{where}: every tensor must be on one CUDA device, got {got} (and the others on {reference})")
    return int(reference.split(":")[1])


def _device_label(x: torch.Tensor) -> str:
    index = x.get_device()  # the hot path's notion of a device: -1 for CPU and meta alike
    return f"cuda:{index}" if index >= 0 else str(x.device)


def _device_name(index: int) -> str:
    return "cpu" if index < 0 else f"cuda:{index}"


def check_scale(scale, where: str = FWD) -> float:
    """A finite real number that fits the kernel's float32 (NumPy scalars accepted), as a float."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        _fail(TypeError, "scale", "a real number (float)", f"{type(scale).__name__} {scale!r}"[:80], where)
    try:
        value = float(scale)
    except OverflowError:  # an int beyond the float range
        value = math.inf
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        _fail(ValueError, "scale", f"finite and within the float32 range (|scale| <= {FLOAT32_MAX:.7g})",
              f"{scale!r}"[:80], where)
    return value


def check_lower_bound(lower_bound, where: str = FWD) -> float:
    if lower_bound is None:
        raise NotImplementedError(
            f"{where}: lower_bound=None selects the softplus gate, which this version does not implement "
            f"yet; pass a bounded-gate lower_bound in [{LOWER_BOUND_RANGE[0]}, {LOWER_BOUND_RANGE[1]}]")
    if isinstance(lower_bound, bool) or not isinstance(lower_bound, numbers.Real):
        _fail(TypeError, "lower_bound", "a real number (float) or None", f"{type(lower_bound).__name__} "
              f"{lower_bound!r}"[:80], where)
    try:
        lb = float(lower_bound)
    except OverflowError:
        lb = -math.inf
    if not (LOWER_BOUND_RANGE[0] <= lb <= LOWER_BOUND_RANGE[1]):
        raise ValueError(
            f"{where}: lower_bound must lie in [{LOWER_BOUND_RANGE[0]}, {LOWER_BOUND_RANGE[1]}], got "
            f"{lower_bound!r:.40}: the chunked kernel factorises the decay as e^(+G) e^(-G) over 16-token chunks, "
            "and |G| <= 16*5 = 80 nats is what stays a normal number in fp32/bf16")
    return lb


def check_v_block(v_block, where: str = FWD) -> int:
    """None, or one of V_BLOCKS as an int (NumPy integers are accepted; floats and bools are not)."""
    if isinstance(v_block, bool) or not isinstance(v_block, numbers.Integral):
        _fail(TypeError, "v_block", f"None or an int in {V_BLOCKS}", f"{type(v_block).__name__} {v_block!r}"[:80],
              where)
    value = operator.index(v_block)
    if value not in V_BLOCKS:
        _fail(ValueError, "v_block", f"one of {V_BLOCKS}", value, where)
    return value


def check_allocation_inputs(q, v, cu_seqlens, where: str) -> None:
    """What ``flash_kda.kda`` reads to allocate out and final_state, checked before it allocates."""
    for name, x, rank in (("q", q, 4), ("v", v, 4)):
        _check_dense(name, x, where)
        if x.dim() != rank:
            _fail(ValueError, name, f"{rank}-D [B, T, H, {name.upper() if name == 'v' else 'K'}]",
                  f"{x.dim()}-D shape {list(x.shape)}", where)
    if cu_seqlens is not None:
        _check_dense("cu_seqlens", cu_seqlens, where)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            _fail(ValueError, "cu_seqlens", "1-D [N + 1] with N >= 0", list(cu_seqlens.shape), where)


def check_inputs(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
                 cu_seqlens, where: str = FWD) -> Problem:
    _check_dense("q", q, where)
    if q.dim() != 4:
        _fail(ValueError, "q", "4-D [B, T, H, K]", f"{q.dim()}-D shape {list(q.shape)}", where)
    B, T, H, K = q.shape
    if K != HEAD_DIM:
        _fail(ValueError, "q", f"head dim K = {HEAD_DIM} (the only one implemented)", f"K = {K}", where)
    _check_dense("v", v, where)
    if v.dim() != 4 or v.shape[-1] != HEAD_DIM:
        _fail(ValueError, "v", f"4-D [B, T, H, V] with V = {HEAD_DIM}", list(v.shape), where)
    _check_tensor("q", q, torch.bfloat16, (B, T, H, K), where)
    _check_tensor("k", k, torch.bfloat16, (B, T, H, K), where)
    _check_tensor("v", v, torch.bfloat16, (B, T, H, HEAD_DIM), where)
    _check_tensor("g", g, torch.bfloat16, (B, T, H, K), where)
    _check_tensor("beta", beta, torch.bfloat16, (B, T, H), where)
    _check_tensor("out", out, torch.bfloat16, (B, T, H, HEAD_DIM), where)
    if not out.is_contiguous():
        _fail(ValueError, "out", "contiguous (it is written in place)", f"strides {out.stride()}", where)
    check_scale(scale, where)
    tensors = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "out": out}
    if A_log is not None:
        _check_tensor("A_log", A_log, torch.float32, (H,), where)
        tensors["A_log"] = A_log
    if dt_bias is not None:
        _check_dense("dt_bias", dt_bias, where)
        expected = (H, K) if dt_bias.dim() == 2 else (H * K,)
        _check_tensor("dt_bias", dt_bias, torch.float32, expected, where)
        tensors["dt_bias"] = dt_bias
    check_lower_bound(lower_bound, where)

    varlen = cu_seqlens is not None
    if varlen:
        _check_dense("cu_seqlens", cu_seqlens, where)
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            _fail(TypeError, "cu_seqlens", "int32 or int64", cu_seqlens.dtype, where)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            _fail(ValueError, "cu_seqlens", "1-D [N + 1] with N >= 0", list(cu_seqlens.shape), where)
        if B != 1:
            _fail(ValueError, "q", "batch size 1 when cu_seqlens is given (varlen packs sequences along T)",
                  f"B = {B}", where)
        tensors["cu_seqlens"] = cu_seqlens
        N = cu_seqlens.numel() - 1
    else:
        N = B

    state_names = []
    for name, state in (("initial_state", initial_state), ("final_state", final_state)):
        if state is None:
            state_names.append("none")
            continue
        _check_dense(name, state, where)
        if state.dtype not in _STATE_NAMES:
            _fail(TypeError, name, "bfloat16 or float32", state.dtype, where)
        _check_tensor(name, state, state.dtype, (N, H, HEAD_DIM, K), where)
        if not state.is_contiguous():
            _fail(ValueError, name, "contiguous [N, H, V, K]", f"strides {state.stride()}", where)
        tensors[name] = state
        state_names.append(_STATE_NAMES[state.dtype])
    dev = _check_devices(tensors, where)
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
    except (AttributeError, TypeError, ValueError, RuntimeError):  # not a tensor, wrong rank, a nested
        return None                                                  # tensor, ...: check_inputs names it
    return dev, N, T, H, B * T, state_in, state_out


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int, where: str = FWD) -> None:
    """Opt-in value check (costs a device->host sync): 0 <= cu[0] <= ... <= cu[N] <= total tokens."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu.numel() == 0:
        return
    if int(cu[0]) < 0:
        raise ValueError(f"{where}: cu_seqlens[0] must be >= 0, got {int(cu[0])}")
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()):
        i = int((steps < 0).nonzero()[0])
        raise ValueError(f"{where}: cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {int(cu[i])} > "
                         f"cu_seqlens[{i + 1}] = {int(cu[i + 1])}")
    if int(cu[-1]) > total_tokens:
        raise ValueError(f"{where}: cu_seqlens[-1] must be <= T = {total_tokens}, got {int(cu[-1])}")


def cu_seqlens_check_enabled() -> bool:
    """FLASH_KDA_CHECK_CU_SEQLENS as read at import."""
    return CHECK_CU_SEQLENS
