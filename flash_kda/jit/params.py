"""Host mirror of ``flash_kda::KdaParams`` (templates/kda_params.cuh): field order and types must match.

``KdaParams`` (ctypes) is the layout reference. The hot path fills the core with one
``struct.pack_into`` of ``PARAMS_STRUCT`` at offset 0, and each block of the extension (input
strides, pools, checkpoints) with its own struct at its own offset only when the call uses it
(``features`` says which, so the kernels never read a stale block). The formats must give the
ctypes bytes: checked here at import for every field offset, byte for byte in
tests/test_hot_path.py, and by a ``static_assert`` in every kernel source on
``sizeof(KdaParams)`` and the offset of ``ext``.
"""
from __future__ import annotations

import ctypes
import struct

# Feature bits (templates/kda_params.cuh, kFeature*).
FEATURE_STRIDED = 1
FEATURE_POOL = 2
FEATURE_PER_TOKEN = 4
FEATURE_HAS_INITIAL = 8
FEATURE_CHECKPOINTS = 16


class TensorStrides(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_longlong), ("token", ctypes.c_longlong), ("head", ctypes.c_longlong)]


class PoolArgs(ctypes.Structure):
    _fields_ = [
        ("state_indices", ctypes.c_void_p),
        ("has_initial_state", ctypes.c_void_p),
        ("num_accepted_tokens", ctypes.c_void_p),
        ("initial_slot_stride", ctypes.c_longlong),
        ("final_slot_stride", ctypes.c_longlong),
        ("indices_row_stride", ctypes.c_longlong),
        ("num_slots", ctypes.c_int),
        ("indices_cols", ctypes.c_int),
        ("indices_int64", ctypes.c_int),
        ("accepted_int64", ctypes.c_int),
    ]


class CheckpointArgs(ctypes.Structure):
    _fields_ = [
        ("checkpoint_offsets", ctypes.c_void_p),
        ("checkpoint_state", ctypes.c_void_p),
        ("num_checkpoints", ctypes.c_int),
        ("offsets_int64", ctypes.c_int),
        ("checkpoint_bf16", ctypes.c_int),
    ]


class KdaExtras(ctypes.Structure):
    _fields_ = [
        ("q", TensorStrides),
        ("k", TensorStrides),
        ("v", TensorStrides),
        ("g", TensorStrides),
        ("beta", TensorStrides),
        ("pool", PoolArgs),
        ("ckpt", CheckpointArgs),
    ]


class KdaParams(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("g", ctypes.c_void_p),
        ("beta", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("A_log", ctypes.c_void_p),
        ("dt_bias", ctypes.c_void_p),
        ("initial_state", ctypes.c_void_p),
        ("final_state", ctypes.c_void_p),
        ("cu_seqlens", ctypes.c_void_p),
        ("total_tokens", ctypes.c_longlong),
        ("seq_len", ctypes.c_int),
        ("num_heads", ctypes.c_int),
        ("num_seqs", ctypes.c_int),
        ("cu_seqlens_int64", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("lower_bound", ctypes.c_float),
        ("features", ctypes.c_int),
        ("ext", KdaExtras),
    ]


# One struct code per field, in order; native ("@") sizes and alignment, as the C structs.
_CORE_CODES = "PPPPPPPPPPP" "q" "iiii" "ff" "i"
_STRIDES_CODES = "qqq" * 5
_POOL_CODES = "PPP" "qqq" "iiii"
_CHECKPOINT_CODES = "PP" "iii"
PARAMS_STRUCT = struct.Struct("@" + _CORE_CODES)
"""Packs (q, k, v, g, beta, out, A_log, dt_bias, initial_state, final_state, cu_seqlens: int
addresses, 0 for null; total_tokens, seq_len, num_heads, num_seqs, cu_seqlens_int64: ints;
scale, lower_bound: floats; features: int) into the core of a KdaParams buffer, at offset 0."""
STRIDES_STRUCT = struct.Struct("@" + _STRIDES_CODES)
"""The (batch, token, head) element strides of q, k, v, g, beta, at ``STRIDES_OFFSET``."""
POOL_STRUCT = struct.Struct("@" + _POOL_CODES)
"""PoolArgs (state_indices, has_initial_state, num_accepted_tokens pointers; initial, final slot
strides, indices row stride; num_slots, indices_cols, indices_int64, accepted_int64), at ``POOL_OFFSET``."""
CHECKPOINT_STRUCT = struct.Struct("@" + _CHECKPOINT_CODES)
"""CheckpointArgs (offsets and state pointers; num_checkpoints, offsets_int64, checkpoint_bf16),
at ``CHECKPOINT_OFFSET``."""
EXT_OFFSET = KdaParams.ext.offset
STRIDES_OFFSET = EXT_OFFSET
POOL_OFFSET = EXT_OFFSET + KdaExtras.pool.offset
CHECKPOINT_OFFSET = EXT_OFFSET + KdaExtras.ckpt.offset
PARAMS_SIZE = ctypes.sizeof(KdaParams)
POOL_SIZE = ctypes.sizeof(PoolArgs)
CHECKPOINT_SIZE = ctypes.sizeof(CheckpointArgs)


def struct_offsets(codes: str) -> list[int]:
    """Byte offset of each field under native struct alignment (to compare with ctypes')."""
    return [struct.calcsize("@" + codes[:i] + "0" + codes[i]) for i in range(len(codes))]


def flat_fields(structure: type, base: int = 0) -> list[tuple[str, int]]:
    """(name, offset) of every scalar field of a ctypes structure, nested structures flattened."""
    fields = []
    for name, ctype in structure._fields_:
        offset = base + getattr(structure, name).offset
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
            fields += [(f"{name}.{inner}", off) for inner, off in flat_fields(ctype, offset)]
        else:
            fields.append((name, offset))
    return fields


def _check_layout() -> None:
    fields = flat_fields(KdaParams)
    blocks = ((PARAMS_STRUCT, 0), (STRIDES_STRUCT, STRIDES_OFFSET), (POOL_STRUCT, POOL_OFFSET),
              (CHECKPOINT_STRUCT, CHECKPOINT_OFFSET))
    expected = [offset + field for fmt, offset in blocks for field in struct_offsets(fmt.format[1:])]
    if [offset for _, offset in fields] != expected or expected[-1] >= PARAMS_SIZE:
        raise ImportError(f"flash_kda: the struct formats {[fmt.format for fmt, _ in blocks]} at offsets "
                          f"{[offset for _, offset in blocks]} do not match the ctypes KdaParams ({PARAMS_SIZE} B)")


_check_layout()


class ParamBlock:
    """A params struct and the one-entry ``void*[]`` that points at it, reused across launches.

    cuLaunchKernel copies the parameter bytes at launch time, so one block per thread can be
    refilled for every call without allocating: ``pack(block.params, 0, *values)`` and, for the
    extension blocks a call uses, ``pack_pool(block.params, POOL_OFFSET, *values)`` and the like.
    """

    __slots__ = ("params", "_argv", "address")

    def __init__(self) -> None:
        self.params = KdaParams()
        self._argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.params))
        self.address = ctypes.addressof(self._argv)


pack = PARAMS_STRUCT.pack_into
pack_strides = STRIDES_STRUCT.pack_into
pack_pool = POOL_STRUCT.pack_into
pack_checkpoints = CHECKPOINT_STRUCT.pack_into
