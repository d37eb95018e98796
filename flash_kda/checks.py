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
from dataclasses import dataclass

import torch

from .jit import env_flag
from .jit.params import FEATURE_CHECKPOINTS, FEATURE_HAS_INITIAL, FEATURE_PER_TOKEN, FEATURE_POOL, FEATURE_STRIDED
from .jit.spec import HEAD_DIM, V_BLOCKS

FWD = "flash_kda.fwd"  # the entry point errors name by default (flash_kda.kda passes its own)
# lower_bound: None (the softplus gate) or a bounded gate's bound in this range: any value a float32 log2
# decay can carry (the kernels scale it by log2(e) and sum 16 tokens of it in float32).
LOWER_BOUND_RANGE = (-1e30, 0.0)
FLOAT32_MAX = 3.4028234663852886e38  # scale is passed to the kernel as a float32
_STATE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
_BF16, _FP32, _INT32, _INT64, _BOOL = torch.bfloat16, torch.float32, torch.int32, torch.int64, torch.bool
_LB_LO, _LB_HI = LOWER_BOUND_RANGE


# read once at import (a per-call environment lookup costs about a microsecond of host time)
CHECK_CU_SEQLENS: bool = env_flag("FLASH_KDA_CHECK_CU_SEQLENS")
CHECK_INDICES: bool = env_flag("FLASH_KDA_CHECK_INDICES")


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
    features: int = 0  # jit/params.py FEATURE_* bits the call needs

    def as_tuple(self) -> tuple:
        """In the order of ``fast_check``'s first eight values."""
        return (self.device_index, self.num_seqs, self.seq_len, self.num_heads, self.total_tokens, self.state_in,
                self.state_out, self.features)


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


def check_lower_bound(lower_bound, where: str = FWD) -> float | None:
    """None (the softplus gate) or a real number in LOWER_BOUND_RANGE (NumPy scalars accepted), as a float."""
    if lower_bound is None:
        return None
    if isinstance(lower_bound, bool) or not isinstance(lower_bound, numbers.Real):
        _fail(TypeError, "lower_bound", "a real number (float) or None", f"{type(lower_bound).__name__} "
              f"{lower_bound!r}"[:80], where)
    try:
        lb = float(lower_bound)
    except OverflowError:
        lb = -math.inf
    if not (LOWER_BOUND_RANGE[0] <= lb <= LOWER_BOUND_RANGE[1]):
        _fail(ValueError, "lower_bound", f"None (the softplus gate) or a bounded gate's bound in "
              f"[{LOWER_BOUND_RANGE[0]:g}, {LOWER_BOUND_RANGE[1]:g}] (finite, at most 0)", f"{lower_bound!r}"[:80], where)
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


def input_readable_in_place(x: torch.Tensor) -> bool:
    """A q/k/v/g the kernels read without a copy: last dim contiguous, every other stride and the
    start 16-byte aligned (the kernels load 8 bf16 at a time). Size-1 dims may have any stride."""
    strides = x.stride()
    if strides[-1] != 1 or x.data_ptr() % 16:
        return False
    return all(size == 1 or stride % 8 == 0 for size, stride in zip(x.shape[:-1], strides[:-1]))


def _pool_problem(state: torch.Tensor, H: int) -> str | None:
    """Why ``state`` is not a pool of contiguous slots [slots, H, V, K] (or None when it is)."""
    strides = state.stride()
    slot = H * HEAD_DIM * HEAD_DIM
    if strides[3] != 1 or strides[2] != HEAD_DIM or (H > 1 and strides[1] != HEAD_DIM * HEAD_DIM):
        return f"strides {strides}: each slot must be a contiguous [H, V, K]"
    if state.shape[0] > 1 and (strides[0] < slot or strides[0] % 4):
        return f"slot stride {strides[0]}: it must be >= H*V*K = {slot} and a multiple of 4 elements"
    if state.data_ptr() % 16:
        return "a start that is not 16-byte aligned"
    return None


def _check_index_tensor(name: str, x, shapes: tuple[tuple[int, ...], ...], where: str) -> None:
    """An int32/int64 tensor of one of ``shapes`` (-1: the free dimension, shown as its name)."""
    _check_dense(name, x, where)
    if x.dtype not in (torch.int32, torch.int64):
        _fail(TypeError, name, "int32 or int64", x.dtype, where)
    if tuple(x.shape) not in shapes:
        free = {"state_indices": "T_max >= 1", "checkpoint_offsets": "C"}.get(name, "?")
        expected = " or ".join(str(list(shape)).replace("-1", free) for shape in shapes)
        _fail(ValueError, name, f"of shape {expected}", list(x.shape), where)


def check_inputs(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
                 cu_seqlens, state_indices=None, has_initial_state=None, num_accepted_tokens=None,
                 checkpoint_offsets=None, checkpoint_state=None, max_seqlen=None, where: str = FWD) -> Problem:
    """Every rule of docs/contract.md, with a message naming the argument; returns what the launch needs.

    Accepts inputs that only need normalising (non-contiguous or misaligned q/k/v/g, non-contiguous
    index tensors, a NumPy scale): the caller copies those and checks again through ``fast_check``."""
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
    if not out.is_contiguous() or out.data_ptr() % 16:
        _fail(ValueError, "out", "contiguous and 16-byte aligned (it is written in place)",
              f"strides {out.stride()}, address {out.data_ptr():#x}", where)
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
        _check_cu_seqlens(cu_seqlens, where)
        if B != 1:
            _fail(ValueError, "q", "batch size 1 when cu_seqlens is given (varlen packs sequences along T)",
                  f"B = {B}", where)
        tensors["cu_seqlens"] = cu_seqlens
        N = cu_seqlens.numel() - 1
    else:
        N = B
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral)
                                   or max_seqlen < 0):
        _fail(TypeError if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool) else ValueError,
              "max_seqlen", "None or an int >= 0 (an upper bound on tokens per sequence)", repr(max_seqlen)[:80],
              where)

    features = 0
    if state_indices is not None:
        _check_dense("state_indices", state_indices, where)
        columns = state_indices.shape[1] if state_indices.dim() == 2 and state_indices.shape[1] >= 1 else -1
        _check_index_tensor("state_indices", state_indices, ((N,), (N, columns)), where)
        if initial_state is None and final_state is None:
            raise ValueError(f"{where}: state_indices addresses slots of initial_state / final_state (the pools), "
                             "but neither was given")
        tensors["state_indices"] = state_indices
        features |= FEATURE_POOL | (FEATURE_PER_TOKEN if state_indices.dim() == 2 else 0)
        if features & FEATURE_PER_TOKEN and final_state is None:
            raise ValueError(f"{where}: a 2-D state_indices stores the state after every token in final_state "
                             "(the pool), which is None")
    if num_accepted_tokens is not None:
        if not features & FEATURE_PER_TOKEN:
            raise ValueError(f"{where}: num_accepted_tokens picks a column of a 2-D state_indices [N, T_max]; give "
                             "one (or leave num_accepted_tokens None)")
        _check_index_tensor("num_accepted_tokens", num_accepted_tokens, ((N,),), where)
        tensors["num_accepted_tokens"] = num_accepted_tokens
    if has_initial_state is not None:
        _check_tensor("has_initial_state", has_initial_state, torch.bool, (N,), where)
        tensors["has_initial_state"] = has_initial_state
        features |= FEATURE_HAS_INITIAL
    if (checkpoint_offsets is None) != (checkpoint_state is None):
        raise ValueError(f"{where}: checkpoint_offsets and checkpoint_state go together; got only "
                         f"{'checkpoint_offsets' if checkpoint_state is None else 'checkpoint_state'}")
    if checkpoint_offsets is not None:
        if features & FEATURE_PER_TOKEN:
            raise ValueError(f"{where}: checkpoints come from the chunked (prefill) kernel; a 2-D state_indices "
                             "(per-token states) runs the decode kernel: use one or the other")
        _check_dense("checkpoint_offsets", checkpoint_offsets, where)
        C = checkpoint_offsets.shape[1] if checkpoint_offsets.dim() == 2 else -1
        _check_index_tensor("checkpoint_offsets", checkpoint_offsets, ((N, C),), where)
        _check_dense("checkpoint_state", checkpoint_state, where)
        if checkpoint_state.dtype not in _STATE_NAMES:
            _fail(TypeError, "checkpoint_state", "float32 or bfloat16", checkpoint_state.dtype, where)
        _check_tensor("checkpoint_state", checkpoint_state, checkpoint_state.dtype, (N, C, H, HEAD_DIM, K), where)
        if not checkpoint_state.is_contiguous() or checkpoint_state.data_ptr() % 16:
            _fail(ValueError, "checkpoint_state", "contiguous and 16-byte aligned (it is written in place)",
                  f"strides {checkpoint_state.stride()}", where)
        tensors["checkpoint_offsets"], tensors["checkpoint_state"] = checkpoint_offsets, checkpoint_state
        features |= FEATURE_CHECKPOINTS

    state_names = []
    for name, state in (("initial_state", initial_state), ("final_state", final_state)):
        if state is None:
            state_names.append("none")
            continue
        _check_dense(name, state, where)
        if state.dtype not in _STATE_NAMES:
            _fail(TypeError, name, "bfloat16 or float32", state.dtype, where)
        if features & FEATURE_POOL:
            if state.dim() != 4 or tuple(state.shape[1:]) != (H, HEAD_DIM, K):
                _fail(ValueError, name, f"a pool of shape [slots, {H}, {HEAD_DIM}, {K}] (state_indices is given)",
                      list(state.shape), where)
            problem = _pool_problem(state, H)
            if problem is not None:
                _fail(ValueError, name, "a pool of contiguous, 16-byte aligned slots (it is read/written in place)",
                      problem, where)
        else:
            _check_tensor(name, state, state.dtype, (N, H, HEAD_DIM, K), where)
            if not state.is_contiguous() or state.data_ptr() % 16:
                _fail(ValueError, name, "contiguous [N, H, V, K], 16-byte aligned", f"strides {state.stride()}", where)
        tensors[name] = state
        state_names.append(_STATE_NAMES[state.dtype])
    if initial_state is not None and final_state is not None and initial_state is not final_state \
            and initial_state.data_ptr() == final_state.data_ptr() and initial_state.dtype != final_state.dtype:
        raise ValueError(f"{where}: initial_state and final_state share memory but differ in dtype")
    if not all(x.is_contiguous() for x in (q, k, v, g, beta)):
        features |= FEATURE_STRIDED
    dev = _check_devices(tensors, where)
    return Problem(num_seqs=N, seq_len=T, total_tokens=B * T, num_heads=H, device_index=dev, state_in=state_names[0],
                   state_out=state_names[1], varlen=varlen, features=features)


def _check_cu_seqlens(cu_seqlens, where: str) -> None:
    _check_dense("cu_seqlens", cu_seqlens, where)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        _fail(TypeError, "cu_seqlens", "int32 or int64", cu_seqlens.dtype, where)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        _fail(ValueError, "cu_seqlens", "1-D [N + 1] with N >= 0", list(cu_seqlens.shape), where)


def _fast_pool(state, H: int, dev: int) -> tuple[str, int, int] | None:
    """(dtype name, slots, slot stride) of a pool the kernels take as it is, or None (see _pool_problem)."""
    shape = state.shape
    name = _STATE_NAMES.get(state.dtype)
    if (name is None or state.get_device() != dev or len(shape) != 4 or shape[1] != H or shape[2] != HEAD_DIM
            or shape[3] != HEAD_DIM):
        return None
    if state.is_contiguous():  # unpadded slots (a size-1 dim's stride is never used): no stride tuple to build
        return name, shape[0], H * HEAD_DIM * HEAD_DIM
    strides = state.stride()
    if (strides[3] != 1 or strides[2] != HEAD_DIM or (H > 1 and strides[1] != HEAD_DIM * HEAD_DIM)
            or (shape[0] > 1 and (strides[0] < H * HEAD_DIM * HEAD_DIM or strides[0] % 4))):
        return None
    return name, shape[0], strides[0]


def fast_check(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
               cu_seqlens, serving=None) -> tuple | None:
    """The common case of ``check_inputs`` in one pass of cheap comparisons (dtype identity,
    torch.Size == tuple, get_device, is_contiguous), without building error messages.

    ``serving`` is None or (state_indices, has_initial_state, num_accepted_tokens,
    checkpoint_offsets, checkpoint_state). Returns (device index, N, T, H, total tokens B*T,
    state_in, state_out, features, pool) when every rule of ``check_inputs`` holds and every
    tensor is laid out as the kernels read it (q/k/v/g either contiguous or
    ``input_readable_in_place``: then ``features`` has FEATURE_STRIDED), ``scale`` and
    ``lower_bound`` are Python floats and ``scale`` fits float32; ``pool`` is the PoolArgs block
    (jit/params.py POOL_STRUCT order) when a pool or has_initial_state is used, else None.
    Returns None otherwise: then ``check_inputs`` must run, to raise the precise error or to accept
    an input that only needs normalising. It never raises for bad input itself (wrong types and
    ranks land in the ``except``). Start addresses are checked for 16-byte alignment by the
    caller, on the pointers it packs.
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
                and out.is_contiguous()
                and type(scale) is float and -FLOAT32_MAX <= scale <= FLOAT32_MAX
                and (lower_bound is None or type(lower_bound) is float and _LB_LO <= lower_bound <= _LB_HI)):
            return None
        features = 0
        if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and g.is_contiguous()
                and beta.is_contiguous()):
            if not (input_readable_in_place(q) and input_readable_in_place(k) and input_readable_in_place(v)
                    and input_readable_in_place(g)):
                return None
            features = FEATURE_STRIDED
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
        pool = None
        state_indices = None
        if serving is not None:
            state_indices, has_initial_state, num_accepted_tokens, checkpoint_offsets, checkpoint_state = serving
            has_initial = 0
            if has_initial_state is not None:
                if not (has_initial_state.dtype is _BOOL and has_initial_state.shape == (N,)
                        and has_initial_state.get_device() == dev and has_initial_state.is_contiguous()):
                    return None
                features |= FEATURE_HAS_INITIAL
                has_initial = has_initial_state.data_ptr()
            if checkpoint_offsets is not None:
                offsets_shape = checkpoint_offsets.shape
                if not (checkpoint_state is not None and len(offsets_shape) == 2 and offsets_shape[0] == N
                        and (checkpoint_offsets.dtype is _INT32 or checkpoint_offsets.dtype is _INT64)
                        and checkpoint_offsets.get_device() == dev and checkpoint_offsets.is_contiguous()
                        and _STATE_NAMES.get(checkpoint_state.dtype) is not None
                        and checkpoint_state.shape == (N, offsets_shape[1], H, HEAD_DIM, K)
                        and checkpoint_state.get_device() == dev and checkpoint_state.is_contiguous()):
                    return None
                features |= FEATURE_CHECKPOINTS
            elif checkpoint_state is not None:
                return None
            if state_indices is not None:
                indices_shape, indices_dtype = state_indices.shape, state_indices.dtype
                if not ((indices_dtype is _INT32 or indices_dtype is _INT64) and indices_shape[0] == N
                        and state_indices.get_device() == dev and state_indices.is_contiguous()):
                    return None
                columns = 1
                if len(indices_shape) == 2:
                    columns = indices_shape[1]
                    if final_state is None or columns < 1 or checkpoint_offsets is not None:
                        return None
                    features |= FEATURE_POOL | FEATURE_PER_TOKEN
                elif len(indices_shape) == 1:
                    features |= FEATURE_POOL
                else:
                    return None
                accepted, accepted_int64 = 0, 0
                if num_accepted_tokens is not None:
                    if len(indices_shape) != 2 or not (
                            num_accepted_tokens.shape == (N,) and num_accepted_tokens.is_contiguous()
                            and (num_accepted_tokens.dtype is _INT32 or num_accepted_tokens.dtype is _INT64)
                            and num_accepted_tokens.get_device() == dev):
                        return None
                    accepted, accepted_int64 = num_accepted_tokens.data_ptr(), num_accepted_tokens.dtype is _INT64
                initial_pool = final_pool = None
                if initial_state is not None:
                    initial_pool = _fast_pool(initial_state, H, dev)
                    if initial_pool is None:
                        return None
                if final_state is initial_state:
                    final_pool = initial_pool
                elif final_state is not None:
                    final_pool = _fast_pool(final_state, H, dev)
                    if final_pool is None:
                        return None
                if initial_pool is None and final_pool is None:
                    return None
                state_in = initial_pool[0] if initial_pool is not None else "none"
                state_out = final_pool[0] if final_pool is not None else "none"
                slots = min(initial_pool[1] if initial_pool is not None else final_pool[1],
                            final_pool[1] if final_pool is not None else initial_pool[1])
                pool = (state_indices.data_ptr(), has_initial, accepted,
                        initial_pool[2] if initial_pool is not None else 0,
                        final_pool[2] if final_pool is not None else 0,
                        columns, slots, columns,  # row stride (contiguous rows), slots, T_max
                        indices_dtype is _INT64, accepted_int64)
            elif num_accepted_tokens is not None:
                return None
            elif has_initial:
                pool = (0, has_initial, 0, 0, 0, 0, 0, 0, 0, 0)
        if state_indices is None:
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
    except (AttributeError, TypeError, ValueError, RuntimeError, IndexError):  # not a tensor, wrong rank, a
        return None                                                          # nested tensor, ...: check_inputs names it
    return dev, N, T, H, B * T, state_in, state_out, features, pool


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


def validate_indices(num_seqs: int, seq_len: int, cu_seqlens, initial_state, final_state, state_indices,
                     num_accepted_tokens, checkpoint_offsets, where: str = FWD) -> None:
    """Opt-in value check of the pool and checkpoint indices (costs a device->host sync).

    Without it the kernels skip what these values make invalid (docs/serving.md); with it, each
    such value raises: a slot outside [0, slots) (negative entries of a 2-D state_indices are
    allowed past the column a sequence starts from: they mean "not stored"), a
    num_accepted_tokens outside [1, T_max], a positive checkpoint offset within its sequence
    that is not a multiple of 16."""
    if state_indices is not None:
        slots = min(x.shape[0] for x in (initial_state, final_state) if x is not None)
        idx = state_indices.detach().to("cpu", torch.int64)
        if idx.dim() == 1:
            bad = ((idx < 0) | (idx >= slots)).nonzero()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"{where}: state_indices[{i}] = {int(idx[i])} is not a slot of the pools "
                                 f"(0 <= slot < {slots}); without check_indices that sequence would be skipped")
        else:
            columns = torch.zeros(num_seqs, dtype=torch.int64)
            if num_accepted_tokens is not None:
                accepted = num_accepted_tokens.detach().to("cpu", torch.int64)
                bad = ((accepted < 1) | (accepted > idx.shape[1])).nonzero()
                if bad.numel():
                    i = int(bad[0])
                    raise ValueError(f"{where}: num_accepted_tokens[{i}] = {int(accepted[i])} must lie in "
                                     f"[1, T_max = {idx.shape[1]}]")
                columns = accepted - 1
            start = idx.gather(1, columns[:, None])[:, 0] if num_seqs else columns
            bad = ((start < 0) | (start >= slots)).nonzero()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"{where}: state_indices[{i}, {int(columns[i])}] = {int(start[i])}, the slot sequence "
                                 f"{i} starts from, is not a slot of the pools (0 <= slot < {slots})")
            bad = (idx >= slots).nonzero()
            if bad.numel():
                i, j = (int(x) for x in bad[0])
                raise ValueError(f"{where}: state_indices[{i}, {j}] = {int(idx[i, j])} is past the pools' {slots} slots "
                                 "(use a negative index for \"not stored\")")
    if checkpoint_offsets is not None:
        if cu_seqlens is not None:
            cu = cu_seqlens.detach().to("cpu", torch.int64)
            lengths = (cu[1:] - cu[:-1]).clamp_min(0)
        else:
            lengths = torch.full((num_seqs,), seq_len, dtype=torch.int64)
        offsets = checkpoint_offsets.detach().to("cpu", torch.int64)
        bad = ((offsets > 0) & (offsets <= lengths[:, None]) & (offsets % 16 != 0)).nonzero()
        if bad.numel():
            i, c = (int(x) for x in bad[0])
            raise ValueError(f"{where}: checkpoint_offsets[{i}, {c}] = {int(offsets[i, c])} is not a multiple of 16: "
                             "checkpoints are taken at chunk ends (without check_indices it is skipped)")


def cu_seqlens_check_enabled() -> bool:
    """FLASH_KDA_CHECK_CU_SEQLENS as read at import."""
    return CHECK_CU_SEQLENS
