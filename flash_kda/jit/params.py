"""Host mirror of ``flash_kda::KdaParams`` (templates/kda_fwd.cuh): field order and types must match.

``KdaParams`` (ctypes) is the layout reference; the hot path fills it with one
``struct.pack_into`` of ``PARAMS_STRUCT``, whose format must give the same bytes (checked
here at import for size and offsets, and byte for byte in tests/test_params.py).
"""
from __future__ import annotations

import ctypes
import struct


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
    ]


# One struct code per KdaParams field, in order; native ("@") sizes and alignment, as the C struct.
_FIELD_CODES = "PPPPPPPPPPP" "q" "iiii" "ff"
PARAMS_STRUCT = struct.Struct("@" + _FIELD_CODES)
"""Packs (q, k, v, g, beta, out, A_log, dt_bias, initial_state, final_state, cu_seqlens: int
addresses, 0 for null; total_tokens, seq_len, num_heads, num_seqs, cu_seqlens_int64: ints;
scale, lower_bound: floats) into a KdaParams buffer."""


def struct_offsets(codes: str = _FIELD_CODES) -> list[int]:
    """Byte offset of each field under native struct alignment (to compare with ctypes')."""
    return [struct.calcsize("@" + codes[:i] + "0" + codes[i]) for i in range(len(codes))]


def _check_layout() -> None:
    fields = [name for name, _ in KdaParams._fields_]
    ctypes_offsets = [getattr(KdaParams, name).offset for name in fields]
    if (len(fields) != len(_FIELD_CODES) or struct_offsets() != ctypes_offsets
            or PARAMS_STRUCT.size != ctypes.sizeof(KdaParams)):
        raise ImportError(f"flash_kda: PARAMS_STRUCT ({PARAMS_STRUCT.format}, {PARAMS_STRUCT.size} B, offsets "
                          f"{struct_offsets()}) does not match KdaParams ({ctypes.sizeof(KdaParams)} B, offsets "
                          f"{ctypes_offsets})")


_check_layout()


class ParamBlock:
    """A params struct and the one-entry ``void*[]`` that points at it, reused across launches.

    cuLaunchKernel copies the parameter bytes at launch time, so one block per thread can be
    refilled for every call without allocating: ``pack(block.params, 0, *values)``.
    """

    __slots__ = ("params", "_argv", "address")

    def __init__(self) -> None:
        self.params = KdaParams()
        self._argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.params))
        self.address = ctypes.addressof(self._argv)


pack = PARAMS_STRUCT.pack_into
