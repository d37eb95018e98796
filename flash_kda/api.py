"""Public entry points: ``fwd`` (FlashKDA-compatible, writes into ``out``) and ``kda`` (allocates).

``fwd`` runs one of two kernel families (flash_kda/jit/spec.py): the chunked kernel for prefill,
and the token-by-token kernel for short sequences (decode, speculative verify with per-token
states). The serving arguments (state pools addressed by slot, ``has_initial_state``, per-token
states, checkpoints, ``max_seqlen``) are keyword-only, so upstream FlashKDA's positional signature
stays; docs/serving.md describes them.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

from . import checks
from .jit import get_kernel
from .jit.arch import ARCHS, VARIANTS, arch_for_capability
from .jit.params import (CHECKPOINT_OFFSET, FEATURE_CHECKPOINTS, FEATURE_PER_TOKEN, FEATURE_POOL, FEATURE_STRIDED,
                         POOL_OFFSET, STRIDES_OFFSET, ParamBlock, pack, pack_checkpoints, pack_pool, pack_strides)
from .jit.runtime import LoadedKernel
from .jit.spec import (HEAD_DIM, PACKAGE, V_BLOCKS, AnySpec, DecodeSpec, KernelSpec, gate_kind, v_blocks_for,
                       spec_state_dtypes)

# Sequences of at most this many tokens run the token-by-token kernel (fixed layout: T; varlen: the
# max_seqlen hint). One less than the chunk, so that every prefix a checkpoint can name (a multiple
# of 16 tokens) runs the chunked kernel when run alone: checkpoints are bitwise equal to it.
DECODE_MAX_TOKENS = 15
# The v_block slot of a launcher key for the token-by-token kernel's builds (spec.DECODE_BUILDS): 8 CTAs
# per head; and 2 or 4, for one-token steps and for multi-token steps.
DECODE, DECODE_STREAMED, DECODE_TOKEN_OUTER = 0, -1, -2
MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z
_DECODE_BUILD_OF = {DECODE: "one_group", DECODE_STREAMED: "streamed", DECODE_TOKEN_OUTER: "token_outer"}

_specs: dict[tuple, AnySpec] = {}
_streams: dict[int, object] = {}
# (device, state_in, state_out, varlen, v_block or DECODE, gate kind) -> (loaded kernel, CTAs per (sequence, head)).
# Plain-tuple keys: hashing a spec (a frozen dataclass) costs more than the whole lookup.
_launchers: dict[tuple, tuple[LoadedKernel, int]] = {}
_local = threading.local()
_is_compiling = torch.compiler.is_compiling
# The custom op's namespace (torch_ops.py): "flash_kda", or the vendored package's dotted name with "_" for "."
# (e.g. "vllm_third_party_flash_kda"), so that a vendored copy and an installed flash_kda in one process each trace
# to their own op (one name registered twice runs the copy imported last for both).
OP_NAMESPACE = PACKAGE.replace(".", "_")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _v_block_thresholds(device_index: int) -> tuple[int, int]:
    """The fewest (sequence, head) pairs for which ``choose_v_block`` picks 128 and 64."""
    sms = _sm_count(device_index)
    if chunk_variant(device_arch(device_index)) == "portable":
        return sms // 2 + 1, sms // 4 + 1  # 2 * units > sms; 4 * units > sms
    return -(-sms * 7 // 2), sms // 4 + 1  # units*2 >= sms*7; units*4 > sms


@functools.lru_cache(maxsize=None)
def _decode_one_wave_units(device_index: int) -> tuple[int, int, int]:
    """The most (sequence, head) pairs whose decode CTAs are all resident at once: with 8 CTAs per
    head (the one-group build), with 4 (the token-outer build, for multi-token steps) and with 2 (the
    streamed build, for one-token steps)."""
    sms = _sm_count(device_index)
    one_group, token_outer = DecodeSpec("fp32", "fp32"), DecodeSpec("fp32", "fp32", build="token_outer")
    streamed = DecodeSpec("fp32", "fp32", build="streamed", arch=device_arch(device_index))
    return (one_group.min_blocks_per_sm * sms // one_group.splits, token_outer.min_blocks_per_sm * sms // 4,
            streamed.min_blocks_per_sm * sms // 2)


def _decode_ctas_per_head(state_in: str, state_out: str, units: int, one_wave_units: tuple[int, int, int],
                          one_token: bool) -> int:
    """CTAs per (sequence, head) of the token-by-token kernel: 8 (the one-group build: one group of 4
    value rows per warp, in registers), or 4 or 2 (two or four groups per warp in shared memory, which
    share each token's norms and gate: the streamed build for one-token steps, the token-outer build
    for several). Small batches run 8, for the most CTAs. Beyond one wave of those, multi-token steps
    (verify) run 4 while those are all resident; then bf16 states run 2, each token's preparation
    shared by 16 rows instead of 4, and fp32 states 8 again. fp32 states are bound by their bytes and
    run best with the most CTAs, but for one-token steps whose streamed launch at 2 CTAs a head fills
    more than half of one wave and fits in it: those run 2 (one wave, where 8 would run two or three).
    bf16 rows move half the bytes for the same per-token work, so sharing it wins. Measured over N = 1
    to 1024 (bench_decode.py --sweep; the fp32 one-token band: bench_decode.py --band; benchmarks/NOTES.md)."""
    fp32 = state_in == "fp32" and state_out == "fp32"
    if one_token and fp32:
        return 2 if one_wave_units[2] // 2 < units <= one_wave_units[2] else 8
    if units <= one_wave_units[0]:
        return 8
    if one_token:
        return 2
    return 4 if units <= one_wave_units[1] else 8 if fp32 else 2


def _decode_halved_tail(num_seqs: int, num_heads: int, ctas_per_head: int, resident_ctas: int) -> int:
    """How many of a grouped build's launch's last sequences run at twice ``ctas_per_head`` (each takes two
    z indices of the grid: kda_decode.cuh decode_cta_of). Their CTAs, half as long and dispatched last,
    shorten the launch's drain, where the SMs empty around long CTAs that then move few bytes: about one
    wave of resident CTAs' worth of them, in launches of at least one and a half waves (at 1.16 waves,
    bf16 one-token N = 12 on the H100, the halved CTAs' extra starts cost 4%; at 1.55 waves, N = 16, they
    gain 3%). H100: one-token bf16 N = 16 and 32 2-3% faster, N = 128 0.6%, verify bf16 within 0.3%
    (benchmarks/NOTES.md, round 27)."""
    if 2 * num_seqs * num_heads * ctas_per_head < 3 * resident_ctas:
        return 0
    return min(num_seqs, MAX_GRID_YZ - num_seqs, max(1, round(resident_ctas / (2 * ctas_per_head * num_heads))))


@contextlib.contextmanager
def _forced_decode_launch(ctas_per_head: int, halved_tail: bool | None = None, max_grid_yz: int | None = None):
    """Every token-by-token launch inside runs at ``ctas_per_head`` CTAs per (sequence, head), whatever
    ``_decode_ctas_per_head`` would pick; with ``halved_tail`` set, the last half of its sequences (True) or
    none (False) at twice that, whatever ``_decode_halved_tail`` would pick; with ``max_grid_yz``, a smaller
    grid limit (1: the flattened grid). Not thread-safe: it replaces this module's rules and restores them
    on exit. For the GPU tests (conftest.py ``decode_ctas``), tools/sanitize_case.py and
    benchmarks/bench_decode.py, which run each launch shape on purpose."""
    global _decode_ctas_per_head, _decode_halved_tail, MAX_GRID_YZ
    saved = _decode_ctas_per_head, _decode_halved_tail, MAX_GRID_YZ
    _decode_ctas_per_head = lambda *args: ctas_per_head  # noqa: E731
    if halved_tail is not None:
        _decode_halved_tail = lambda num_seqs, *args: num_seqs // 2 if halved_tail else 0  # noqa: E731
    if max_grid_yz is not None:
        MAX_GRID_YZ = max_grid_yz
    try:
        yield
    finally:
        _decode_ctas_per_head, _decode_halved_tail, MAX_GRID_YZ = saved


def choose_v_block(units: int, device_index: int) -> int:
    """V-slice width per CTA for ``units`` (sequence, head) pairs.

    A width of 32 or 64 runs 4 or 2 CTAs per pair. In the clustered variant they form clusters of
    two that share each chunk's preparation; a pair of 64-wide CTAs steps through a chunk about twice
    as fast as one 128-wide CTA, so 64 wins until the pairs alone fill the SMs several times over
    (units >= 3.5 * SMs), and 32 wins while all four slices of every pair fit at once (4 * units <=
    SMs). In the portable variant every CTA prepares every chunk itself, so a narrower slice only
    pays while its CTAs fit in one wave: 32 while 4 * units <= SMs, 64 while 2 * units <= SMs, else
    128. The thresholds come from the H100 sweeps in benchmarks/bench_fwd.py (BENCHMARK_H100.md)."""
    t128, t64 = _v_block_thresholds(device_index)
    return 128 if units >= t128 else 64 if units >= t64 else 32


@functools.lru_cache(maxsize=None)
def chunk_variant(arch: str) -> str:
    """The chunked kernel's variant on ``arch``: ``FLASH_KDA_KERNEL`` (clustered or portable; read once
    per process), else clustered where the arch table allows it and portable elsewhere. The
    token-by-token kernel is the same in both."""
    has_clusters = ARCHS[arch].clusters
    choice = os.environ.get("FLASH_KDA_KERNEL", "").strip().lower()
    if not choice:
        return "clustered" if has_clusters else "portable"
    if choice not in VARIANTS:
        raise ValueError(f"flash_kda: FLASH_KDA_KERNEL must be one of {', '.join(VARIANTS)} (or unset), "
                         f"got {os.environ['FLASH_KDA_KERNEL']!r}")
    if choice == "clustered" and not has_clusters:
        raise RuntimeError(f"flash_kda: FLASH_KDA_KERNEL=clustered, but {arch} runs only the portable variant "
                           "(no thread-block clusters, or too little shared memory for their slot ring: "
                           "flash_kda/jit/arch.py); unset it or set it to portable")
    return choice


def reset_variant() -> None:
    """Forget the variant read from FLASH_KDA_KERNEL and what was picked with it (for tests and
    benchmarks that switch it within one process)."""
    chunk_variant.cache_clear()
    _v_block_thresholds.cache_clear()
    _specs.clear()
    _launchers.clear()


def _spec(state_in: str, state_out: str, varlen: bool, v_block: int, gate: str, arch: str) -> AnySpec:
    """The specialisation that serves a launcher key. A chunk width the gate cannot run on this arch (the
    general gates at 128 where registers cannot be reallocated: spec.v_blocks_for) becomes the widest it can."""
    key = (state_in, state_out, varlen, v_block, gate, arch)
    spec = _specs.get(key)
    if spec is None:
        variant = chunk_variant(arch)  # read for every kind: a bad FLASH_KDA_KERNEL fails the first launch of any
        state_in, state_out = spec_state_dtypes(state_in, state_out)
        if v_block > DECODE:
            v_block = max(width for width in v_blocks_for(gate, arch) if width <= v_block)
        spec = _specs[key] = (DecodeSpec(state_in=state_in, state_out=state_out, varlen=varlen, arch=arch,
                                         build=_DECODE_BUILD_OF[v_block], gate=gate)
                              if v_block <= DECODE else
                              KernelSpec(state_in=state_in, state_out=state_out, v_block=v_block,
                                         arch=arch, gate=gate,
                                         cluster=None if variant == "clustered" else 1))
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


def _launcher(device_index: int, state_in: str, state_out: str, varlen: bool, v_block: int,
              gate: str) -> tuple[LoadedKernel, int]:
    """Slow path of the launcher cache: load (or compile) the kernel."""
    spec = _spec(state_in, state_out, varlen, v_block, gate, device_arch(device_index))
    launcher = (get_kernel(spec, device_index), spec.splits)
    _launchers[(device_index, state_in, state_out, varlen, v_block, gate)] = launcher
    return launcher


def workspace_size(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> int:
    """Bytes of scratch memory ``fwd`` needs for these shapes: always 0.

    The kernels are fused (no workspace round trip), so callers that preallocate for CUDA
    graphs may pass ``workspace=None`` or any buffer; nothing is allocated per call."""
    return 0


def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
        out: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None, lower_bound: float | None,
        initial_state: torch.Tensor | None = None, final_state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None, *, state_indices: torch.Tensor | None = None,
        has_initial_state: torch.Tensor | None = None, num_accepted_tokens: torch.Tensor | None = None,
        max_seqlen: int | None = None, checkpoint_offsets: torch.Tensor | None = None,
        checkpoint_state: torch.Tensor | None = None, check_cu_seqlens: bool | None = None,
        check_indices: bool | None = None, v_block: int | None = None,
        workspace: torch.Tensor | None = None) -> torch.Tensor:
    """KDA forward (docs/algorithm.md), drop-in for upstream FlashKDA's ``flash_kda.fwd``.

    Writes ``out`` [B, T, H, V] (and ``final_state`` when given, which may be the very tensor
    passed as ``initial_state``) and returns ``out``. The keyword-only serving arguments
    (docs/serving.md):

    * ``state_indices`` [N] or [N, T_max] int32/int64: the states are pools [slots, H, V, K];
      sequence i reads and writes slot ``state_indices[i]`` (a negative or out-of-range slot skips
      the sequence); a 2-D index stores the state after token j in slot ``state_indices[i, j]``
      and reads slot ``state_indices[i, num_accepted_tokens[i] - 1]``;
    * ``has_initial_state`` [N] bool: False starts that sequence from zeros;
    * ``max_seqlen``: an upper bound on tokens per varlen sequence, so that short batches run the
      token-by-token kernel without a host sync (results never depend on it);
    * ``checkpoint_offsets`` [N, C] / ``checkpoint_state`` [N, C, H, V, K]: the state after the
      first ``offset`` tokens of each sequence (offsets that are positive multiples of 16).

    ``check_cu_seqlens`` / ``check_indices`` (or FLASH_KDA_CHECK_CU_SEQLENS / FLASH_KDA_CHECK_INDICES
    at import) validate the values those tensors hold, at the cost of a host sync; otherwise
    the kernels clamp or skip and never access memory out of bounds. ``v_block`` overrides the
    V-slice width of the chunked kernel (a tuning knob: 32, 64 or 128; the softplus gate and
    lower_bound < -5 run 128 as 64); ``workspace`` is accepted
    for callers that preallocate (``workspace_size`` is 0). Under ``torch.compile`` the call goes
    through the ``flash_kda::fwd`` custom op (``OP_NAMESPACE::fwd`` in a vendored copy).

    This is the per-call hot path (a few microseconds of host time is the budget): one pass of
    cheap checks, one cached launcher lookup, one ``struct.pack_into`` of the parameters (and one
    per extension block a call uses) and the driver launch. Anything unusual goes through
    ``_fwd_normalised``.
    """
    if _is_compiling():
        # A mutated Optional argument that is None breaks torch.compile's fake-tensor call in torch 2.11:
        # an empty 1-D tensor stands for it (torch_ops.py maps it back to None).
        absent = out.new_empty(0)
        getattr(torch.ops, OP_NAMESPACE).fwd(
            q, k, v, g, beta, checks.check_scale(scale), out, A_log, dt_bias, lower_bound, initial_state,
            absent if final_state is None else final_state, cu_seqlens, state_indices, has_initial_state,
            num_accepted_tokens, max_seqlen, checkpoint_offsets, absent if checkpoint_state is None else checkpoint_state,
            check_cu_seqlens, check_indices, v_block)
        return out
    serving = None
    if not (state_indices is None and has_initial_state is None and checkpoint_offsets is None
            and checkpoint_state is None and num_accepted_tokens is None):
        serving = (state_indices, has_initial_state, num_accepted_tokens, checkpoint_offsets, checkpoint_state)
    problem = checks.fast_check(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state,
                                final_state, cu_seqlens, serving)
    if max_seqlen is not None and (type(max_seqlen) is not int or max_seqlen < 0):
        problem = None  # check_inputs names it (or takes a NumPy integer)
    if problem is not None:
        q_ptr, k_ptr, v_ptr, g_ptr, out_ptr = q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(), out.data_ptr()
        initial_ptr = initial_state.data_ptr() if initial_state is not None else 0
        final_ptr = final_state.data_ptr() if final_state is not None else 0
        dt_ptr = dt_bias.data_ptr() if dt_bias is not None else 0
        if (q_ptr | k_ptr | v_ptr | g_ptr | out_ptr | initial_ptr | final_ptr | dt_ptr) & 15:
            problem = None  # a misaligned start: the kernels move 16 bytes at a time
    if problem is None:
        return _fwd_normalised(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state,
                               final_state, cu_seqlens, state_indices, has_initial_state, num_accepted_tokens,
                               max_seqlen, checkpoint_offsets, checkpoint_state, check_cu_seqlens, check_indices,
                               v_block)
    index, N, T, H, total_tokens, state_in, state_out, features, pool = problem
    if cu_seqlens is None:
        varlen, cu_ptr, cu_int64 = False, 0, 0
    else:
        if check_cu_seqlens or (check_cu_seqlens is None and checks.CHECK_CU_SEQLENS):
            checks.validate_cu_seqlens(cu_seqlens, total_tokens)
        varlen, cu_ptr, cu_int64 = True, cu_seqlens.data_ptr(), cu_seqlens.dtype is torch.int64
    units = N * H
    if units == 0:
        return out
    if v_block is not None and (type(v_block) is not int or v_block not in V_BLOCKS):
        v_block = checks.check_v_block(v_block)  # raises, or normalises a NumPy integer
    # short sequences (the max_seqlen hint when varlen) and per-token states: the token-by-token kernel;
    # checkpoints: always the chunked one
    short = max_seqlen is not None and max_seqlen <= DECODE_MAX_TOKENS if varlen else T <= DECODE_MAX_TOKENS
    ctas_per_head = 0
    if short and not features & FEATURE_CHECKPOINTS or features & FEATURE_PER_TOKEN:
        one_token = (max_seqlen == 1 if varlen else T == 1) and not features & FEATURE_PER_TOKEN
        one_wave_units = _decode_one_wave_units(index)
        ctas_per_head = _decode_ctas_per_head(state_in, state_out, units, one_wave_units, one_token)
        v_block = DECODE if ctas_per_head == 8 else DECODE_STREAMED if one_token else DECODE_TOKEN_OUTER
    elif v_block is None:
        v_block = choose_v_block(units, index)
    # the gate kind: the decode kernel's bounded build takes every lower_bound (the general gates' chunk
    # widths per arch are _spec's to apply)
    gate = gate_kind(lower_bound)
    if v_block <= DECODE and gate == "bounded_wide":
        gate = "bounded"
    if lower_bound is None:
        lower_bound = 0.0  # packed; the softplus gate does not read it
    launcher = _launchers.get((index, state_in, state_out, varlen, v_block, gate))
    if launcher is None:
        launcher = _launcher(index, state_in, state_out, varlen, v_block, gate)
    kernel, splits = launcher
    if ctas_per_head:
        splits = ctas_per_head

    block = getattr(_local, "block", None)
    if block is None:
        block = _local.block = ParamBlock()
    params = block.params
    pack(params, 0, q_ptr, k_ptr, v_ptr, g_ptr, beta.data_ptr(), out_ptr, A_log.data_ptr() if A_log is not None else 0,
         dt_ptr, initial_ptr, final_ptr, cu_ptr, total_tokens, T, H, N, cu_int64, scale, lower_bound, features)
    if features:
        if pool is not None:
            pack_pool(params, POOL_OFFSET, *pool)
        if features & FEATURE_STRIDED:
            pack_strides(params, STRIDES_OFFSET, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *g.stride()[:3],
                         *beta.stride())
        if features & FEATURE_CHECKPOINTS:
            pack_checkpoints(params, CHECKPOINT_OFFSET, checkpoint_offsets.data_ptr(), checkpoint_state.data_ptr(),
                             checkpoint_offsets.shape[1], checkpoint_offsets.dtype is torch.int64,
                             checkpoint_state.dtype is torch.bfloat16)
        if features & (FEATURE_POOL | FEATURE_CHECKPOINTS) and (
                check_indices or (check_indices is None and checks.CHECK_INDICES)):
            checks.validate_indices(N, T, cu_seqlens, initial_state, final_state, state_indices, num_accepted_tokens,
                                    checkpoint_offsets)
    stream = _streams.get(torch._C._cuda_getCurrentRawStream(index))
    if stream is None:
        stream = _stream_handle(index)
    # the token-by-token kernel's grid is (CTAs a head, H, N): no integer division in its CTAs' start; a
    # grouped build's launch of several waves ends on its last sequences at twice the CTAs a head, (CTAs a
    # head * H, 1, N + tail); flattened where N or H exceeds a grid dimension (kda_decode.cuh decode_cta_of)
    if ctas_per_head and N <= MAX_GRID_YZ and H <= MAX_GRID_YZ:
        grid_x, grid_y, grid_z = ctas_per_head, H, N
        if ctas_per_head < 8:
            resident = one_wave_units[2] * 2 if one_token else one_wave_units[1] * 4  # the build's CTAs in one wave
            tail = _decode_halved_tail(N, H, ctas_per_head, resident)
            if tail:
                grid_x, grid_y, grid_z = ctas_per_head * H, 1, N + tail
    else:
        grid_x, grid_y, grid_z = units * splits, 1, 1
    if torch._C._cuda_getDevice() == index:
        kernel.launch(grid_x, grid_y, grid_z, stream, block.address)
    else:  # tensors on another GPU than the current one: launch in that device's context
        kernel.launch_in_own_context(grid_x, grid_y, grid_z, stream, block.address)
    return out


def _readable(x):
    """q/k/v/g as the kernels can read them: the tensor itself, or a contiguous (aligned) copy."""
    return x if checks.input_readable_in_place(x) else x.clone(memory_format=torch.contiguous_format)


def _contiguous(x):
    return x if x is None or x.is_contiguous() else x.contiguous()


def _fwd_normalised(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
                    cu_seqlens, state_indices, has_initial_state, num_accepted_tokens, max_seqlen,
                    checkpoint_offsets, checkpoint_state, check_cu_seqlens: bool | None, check_indices: bool | None,
                    v_block: int | None) -> torch.Tensor:
    """The inputs ``checks.fast_check`` did not take: raise the precise error, or normalise
    (copies the kernels can read, float scale and lower_bound) and launch through the hot path."""
    checks.check_inputs(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
                        cu_seqlens, state_indices, has_initial_state, num_accepted_tokens, checkpoint_offsets,
                        checkpoint_state, max_seqlen)
    if v_block is not None:
        v_block = checks.check_v_block(v_block)
    if max_seqlen is not None:
        max_seqlen = int(max_seqlen)
    # the copies stay referenced until the launch has been enqueued (the caching allocator then
    # keeps their memory valid in stream order); states and checkpoints are written in place (checked)
    q, k, v, g = _readable(q), _readable(k), _readable(v), _readable(g)
    beta, A_log, cu_seqlens = _contiguous(beta), _contiguous(A_log), _contiguous(cu_seqlens)
    if dt_bias is not None and (not dt_bias.is_contiguous() or dt_bias.data_ptr() % 16):
        dt_bias = dt_bias.clone(memory_format=torch.contiguous_format)  # read 4 floats at a time
    state_indices, has_initial_state = _contiguous(state_indices), _contiguous(has_initial_state)
    num_accepted_tokens, checkpoint_offsets = _contiguous(num_accepted_tokens), _contiguous(checkpoint_offsets)
    scale, lower_bound = checks.check_scale(scale), checks.check_lower_bound(lower_bound)
    args = (q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state, cu_seqlens)
    serving = dict(state_indices=state_indices, has_initial_state=has_initial_state,
                   num_accepted_tokens=num_accepted_tokens, checkpoint_offsets=checkpoint_offsets,
                   checkpoint_state=checkpoint_state)
    if checks.fast_check(*args, tuple(serving.values())) is None:  # would recurse forever
        described = [(x.dtype, tuple(x.shape), x.device, x.stride()) if isinstance(x, torch.Tensor) else x
                     for x in (*args, *serving.values())]
        raise RuntimeError("flash_kda.fwd: internal error: checks.fast_check refuses inputs that "
                           f"checks.check_inputs accepted, after normalising them: {described}")
    return fwd(*args, **serving, max_seqlen=max_seqlen, check_cu_seqlens=check_cu_seqlens,
               check_indices=check_indices, v_block=v_block)


def kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
        scale: float | None = None, A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
        lower_bound: float | None = -5.0, initial_state: torch.Tensor | None = None,
        output_final_state: bool = False, final_state_dtype: torch.dtype = torch.float32,
        cu_seqlens: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convenience form in the style of FLA's ``chunk_kda``: allocates and returns (out, final_state or None).

    ``kwargs`` are ``fwd``'s keyword-only extras (``check_cu_seqlens``, ``v_block``, ``max_seqlen``, ...)."""
    where = "flash_kda.kda"
    checks.check_allocation_inputs(q, v, cu_seqlens, where)  # what the allocations below read
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    final_state = None
    if output_final_state:
        N = cu_seqlens.numel() - 1 if cu_seqlens is not None else q.shape[0]
        final_state = torch.empty(N, q.shape[2], HEAD_DIM, q.shape[-1], dtype=final_state_dtype, device=q.device)
    args = (q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state, cu_seqlens)
    if not torch.compiler.is_compiling():  # a convenience entry: the detailed checks, naming flash_kda.kda
        serving = {name: kwargs.get(name) for name in ("state_indices", "has_initial_state", "num_accepted_tokens",
                                                       "checkpoint_offsets", "checkpoint_state", "max_seqlen")}
        checks.check_inputs(*args, **serving, where=where)
        if kwargs.get("v_block") is not None:
            checks.check_v_block(kwargs["v_block"], where)
    fwd(*args, **kwargs)
    return out, final_state
