"""Host mirror of ``flash_kda::KdaParams`` (templates/kda_fwd.cuh): field order and types must match."""
from __future__ import annotations

import ctypes


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


class ParamBlock:
    """A params struct and the one-entry ``void*[]`` that points at it, reused across launches.

    cuLaunchKernel copies the parameter bytes at launch time, so one block per thread can be
    refilled for every call without allocating.
    """

    __slots__ = ("params", "_argv", "address")

    def __init__(self) -> None:
        self.params = KdaParams()
        self._argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.params))
        self.address = ctypes.addressof(self._argv)
