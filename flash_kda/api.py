"""Public entry points: ``fwd`` (FlashKDA-compatible, writes into ``out``) and ``kda`` (allocates)."""
from __future__ import annotations

import functools
import threading

import torch

from . import checks
from .jit import get_kernel
from .jit.params import ParamBlock, pack
from .jit.arch import ARCHS, arch_for_capability
from .jit.runtime import LoadedKernel
from .jit.spec import V_BLOCKS, KernelSpec

_specs: dict[tuple, KernelSpec] = {}
_streams: dict[int, object] = {}
# (device, state_in, state_out, varlen, v_block) -> (loaded kernel, CTAs per (sequence, head)).
# Plain-tuple keys: hashing a KernelSpec (a frozen dataclass) costs more than the whole lookup.
_launchers: dict[tuple, tuple[LoadedKernel, int]] = {}
_local = threading.local()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _v_block_thresholds(device_index: int) -> tuple[int, int]:
    """The fewest (sequence, head) pairs for which ``choose_v_block`` picks 128 and 64."""
    sms = _sm_count(device_index)
    return -(-sms * 7 // 2), sms // 4 + 1  # units*2 >= sms*7; units*4 > sms


def choose_v_block(units: int, device_index: int) -> int:
    """V-slice width per CTA for ``units`` (sequence, head) pairs.

    A width of 32 or 64 runs 4 or 2 CTAs per pair, in clusters of two that share each chunk's
    preparation; a pair of 64-wide CTAs steps through a chunk about twice as fast as one
    128-wide CTA, so 64 wins until the pairs alone fill the SMs several times over (units >=
    3.5 * SMs), and 32 wins while all four slices of every pair fit at once (4 * units <= SMs).
    The thresholds come from the H100 sweep in benchmarks/bench_fwd.py (BENCHMARK_H100.md)."""
    t128, t64 = _v_block_thresholds(device_index)
    return 128 if units >= t128 else 64 if units >= t64 else 32


def _spec(state_in: str, state_out: str, varlen: bool, v_block: int, arch: str) -> KernelSpec:
    key = (state_in, state_out, varlen, v_block, arch)
    spec = _specs.get(key)
    if spec is None:
        spec = _specs[key] = KernelSpec(state_in=state_in, state_out=state_out, varlen=varlen, v_block=v_block,
                                        arch=arch)
    return spec


@functools.lru_cache(maxsize=None)
def device_arch(device_index: int) -> str:
    """The compiler target for the GPU ``cuda:device_index`` (from the arch table)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    arch = arch_for_capability(major, minor)
    if arch is None:
        raise RuntimeError(f"flash_kda: cuda:{device_index} ({torch.cuda.get_device_name(device_index)}) has compute "
                           f"capability {major}.{minor}, for which no kernels exist; supported targets: "
                           + "; ".join(f"{a.target} ({a.gpus})" for a in ARCHS.values()))
    return arch.target


def _stream_handle(device_index: int):
    """The driver handle of the current stream (cached per raw stream value)."""
    raw = torch._C._cuda_getCurrentRawStream(device_index)
    handle = _streams.get(raw)
    if handle is None:
        from cuda.bindings import driver
        handle = _streams[raw] = driver.CUstream(raw)
    return handle


def _launcher(device_index: int, state_in: str, state_out: str, varlen: bool,
              v_block: int) -> tuple[LoadedKernel, int]:
    """Slow path of the launcher cache: load (or compile) the kernel."""
    spec = _spec(state_in, state_out, varlen, v_block, device_arch(device_index))
    launcher = (get_kernel(spec, device_index), spec.splits)
    _launchers[(device_index, state_in, state_out, varlen, v_block)] = launcher
    return launcher


def _contiguous(x):
    return x if x is None or x.is_contiguous() else x.contiguous()


def workspace_size(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> int:
    """Bytes of scratch memory ``fwd`` needs for these shapes: always 0.

    The kernel is fused (no workspace round trip), so callers that preallocate for CUDA
    graphs may pass ``workspace=None`` or any buffer; nothing is allocated per call."""
    return 0


def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
        out: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None, lower_bound: float | None,
        initial_state: torch.Tensor | None = None, final_state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None, *, check_cu_seqlens: bool | None = None,
        v_block: int | None = None, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """KDA forward (docs/algorithm.md), drop-in for upstream FlashKDA's ``flash_kda.fwd``.

    Writes ``out`` [B, T, H, V] (and ``final_state`` [N, H, V, K] when given, which may be the
    very tensor passed as ``initial_state``) and returns ``out``. ``check_cu_seqlens=True`` (or
    FLASH_KDA_CHECK_CU_SEQLENS=1 at import) validates the varlen offsets at the cost of a host
    sync; ``v_block`` overrides the V-slice width per CTA (a tuning knob: 32, 64 or 128);
    ``workspace`` is accepted for callers that preallocate (``workspace_size`` is 0).
    Under ``torch.compile`` the call goes through the ``flash_kda::fwd`` custom op.
    """
    if torch.compiler.is_compiling():
        torch.ops.flash_kda.fwd(q, k, v, g, beta, checks.check_scale(scale), out, A_log, dt_bias, lower_bound, initial_state,
                                final_state, cu_seqlens, check_cu_seqlens, v_block)
        return out
    return fwd_eager(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
                     cu_seqlens, check_cu_seqlens=check_cu_seqlens, v_block=v_block)


def fwd_eager(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state=None, final_state=None,
              cu_seqlens=None, *, check_cu_seqlens: bool | None = None, v_block: int | None = None,
              where: str = checks.FWD) -> torch.Tensor:
    """``fwd`` without the torch.compile routing: check, pick the kernel, launch.

    This is the per-call hot path (a few microseconds of host time is the budget): one pass
    of cheap checks, one cached launcher lookup, one ``struct.pack_into`` of the parameters
    and the driver launch. Anything unusual goes through ``_fwd_normalised``."""
    problem = checks.fast_check(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state,
                                final_state, cu_seqlens)
    if problem is None:
        return _fwd_normalised(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state,
                               final_state, cu_seqlens, check_cu_seqlens, v_block, where)
    index, N, T, H, total_tokens, state_in, state_out = problem
    if cu_seqlens is None:
        varlen, cu_ptr, cu_int64 = False, 0, 0
    else:
        if check_cu_seqlens or (check_cu_seqlens is None and checks.CHECK_CU_SEQLENS):
            checks.validate_cu_seqlens(cu_seqlens, total_tokens, where)
        varlen, cu_ptr, cu_int64 = True, cu_seqlens.data_ptr(), cu_seqlens.dtype is torch.int64
    units = N * H
    if units == 0:
        return out
    if v_block is None:
        thresholds = _v_block_thresholds(index)
        v_block = 128 if units >= thresholds[0] else 64 if units >= thresholds[1] else 32
    elif type(v_block) is not int or v_block not in V_BLOCKS:
        v_block = checks.check_v_block(v_block, where)  # raises, or normalises a NumPy integer
    launcher = _launchers.get((index, state_in, state_out, varlen, v_block))
    if launcher is None:
        launcher = _launcher(index, state_in, state_out, varlen, v_block)
    kernel, splits = launcher

    block = getattr(_local, "block", None)
    if block is None:
        block = _local.block = ParamBlock()
    pack(block.params, 0, q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(), beta.data_ptr(), out.data_ptr(),
         A_log.data_ptr() if A_log is not None else 0, dt_bias.data_ptr() if dt_bias is not None else 0,
         initial_state.data_ptr() if initial_state is not None else 0,
         final_state.data_ptr() if final_state is not None else 0, cu_ptr,
         total_tokens, T, H, N, cu_int64, scale, lower_bound)
    stream = _streams.get(torch._C._cuda_getCurrentRawStream(index))
    if stream is None:
        stream = _stream_handle(index)
    if torch._C._cuda_getDevice() == index:
        kernel.launch(units * splits, stream, block.address)
    else:  # tensors on another GPU than the current one: launch in that device's context
        kernel.launch_in_own_context(units * splits, stream, block.address)
    return out


def _fwd_normalised(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
                    cu_seqlens, check_cu_seqlens: bool | None, v_block: int | None, where: str) -> torch.Tensor:
    """The inputs ``checks.fast_check`` did not take: raise the precise error, or normalise
    (contiguous copies, float scale and lower_bound) and launch through the hot path."""
    checks.check_inputs(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
                        cu_seqlens, where)
    if v_block is not None:
        v_block = checks.check_v_block(v_block, where)
    # the copies stay referenced until the launch has been enqueued (the caching allocator then
    # keeps their memory valid in stream order); an in-place state is contiguous (checked)
    q, k, v, g, beta = _contiguous(q), _contiguous(k), _contiguous(v), _contiguous(g), _contiguous(beta)
    A_log, dt_bias, cu_seqlens = _contiguous(A_log), _contiguous(dt_bias), _contiguous(cu_seqlens)
    scale, lower_bound = checks.check_scale(scale, where), checks.check_lower_bound(lower_bound, where)
    args = (q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state, cu_seqlens)
    if checks.fast_check(*args) is None:  # would recurse forever: the two checkers disagree
        described = [(x.dtype, tuple(x.shape), x.device, x.stride()) if isinstance(x, torch.Tensor) else x
                     for x in args]
        raise RuntimeError("flash_kda.fwd: internal error: checks.fast_check refuses inputs that "
                           f"checks.check_inputs accepted, after normalising them: {described}")
    return fwd_eager(*args, check_cu_seqlens=check_cu_seqlens, v_block=v_block, where=where)


def kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
        scale: float | None = None, A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
        lower_bound: float | None = -5.0, initial_state: torch.Tensor | None = None,
        output_final_state: bool = False, final_state_dtype: torch.dtype = torch.float32,
        cu_seqlens: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convenience form in the style of FLA's ``chunk_kda``: allocates and returns (out, final_state or None).

    ``kwargs`` are ``fwd``'s keyword-only extras (``check_cu_seqlens``, ``v_block``)."""
    where = "flash_kda.kda"
    checks.check_allocation_inputs(q, v, cu_seqlens, where)  # what the allocations below read
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    final_state = None
    if output_final_state:
        N = cu_seqlens.numel() - 1 if cu_seqlens is not None else q.shape[0]
        final_state = torch.empty(N, q.shape[2], v.shape[-1], q.shape[-1], dtype=final_state_dtype,
                                  device=q.device)
    args = (q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state, cu_seqlens)
    if torch.compiler.is_compiling():
        fwd(*args, **kwargs)
    else:
        fwd_eager(*args, **kwargs, where=where)
    return out, final_state
