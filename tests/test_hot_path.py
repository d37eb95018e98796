"""The per-call hot path on CPU (device calls stubbed): ``struct.pack_into`` gives the ctypes
KdaParams bytes, ``checks.fast_check`` agrees with ``checks.check_inputs``, and ``fwd`` packs
the right parameters and grid for what it launches."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import flash_kda
from flash_kda import api, checks
from flash_kda.jit.params import (CHECKPOINT_OFFSET, CHECKPOINT_STRUCT, FEATURE_STRIDED, POOL_OFFSET, POOL_STRUCT,
                                  STRIDES_OFFSET, STRIDES_STRUCT, PARAMS_STRUCT, KdaParams, ParamBlock, flat_fields,
                                  pack, pack_checkpoints, pack_pool, pack_strides, struct_offsets)

from stub_device import inputs, launch_params

POINTER_FIELDS = ("q", "k", "v", "g", "beta", "out", "A_log", "dt_bias", "initial_state", "final_state",
                  "cu_seqlens")


BLOCKS = [(PARAMS_STRUCT, 0, pack), (STRIDES_STRUCT, STRIDES_OFFSET, pack_strides),
          (POOL_STRUCT, POOL_OFFSET, pack_pool), (CHECKPOINT_STRUCT, CHECKPOINT_OFFSET, pack_checkpoints)]


def test_struct_layout_matches_ctypes():
    assert ctypes.sizeof(KdaParams) == 344 and (STRIDES_OFFSET, POOL_OFFSET, CHECKPOINT_OFFSET) == (128, 248, 312)
    fields = flat_fields(KdaParams)
    offsets = [offset + field for fmt, offset, _ in BLOCKS for field in struct_offsets(fmt.format[1:])]
    assert offsets == [offset for _, offset in fields]


def _set_fields(structure, names_offsets, values):
    """Set each (possibly nested, 'a.b') field of a ctypes structure to its value."""
    for (name, _), value in zip(names_offsets, values):
        target = structure
        *path, leaf = name.split(".")
        for part in path:
            target = getattr(target, part)
        is_pointer = dict(type(target)._fields_)[leaf] is ctypes.c_void_p
        setattr(target, leaf, (value or None) if is_pointer else value)


@pytest.mark.parametrize("values", [
    (0x7F0000001000, 0x7F0000002000, 0x7F0000003000, 0x7F0000004000, 0x7F0000005000, 0x7F0000006000,
     0, 0x7F0000008000, 0, 0x7FFFFFFFFFF0, 0xFFFFFFFFFFFFFFF0, 3 * 2 ** 33, 16, 96, 6, 1, 128 ** -0.5, -5.0, 31),
    (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 0, 0, 0, 0, 1e-30, -0.0, 0),
    (0,) * 11 + (-1, -(2 ** 31), 2 ** 31 - 1, 7, 0, 3.4028234663852886e38, -4.999, 2 ** 31 - 1),
])
def test_pack_into_gives_the_ctypes_bytes(values):
    block = ParamBlock()
    pack(block.params, 0, *values)
    reference = KdaParams()
    _set_fields(reference, flat_fields(KdaParams), values)
    assert bytes(block.params) == bytes(reference)
    assert ctypes.c_void_p.from_address(block.address).value == ctypes.addressof(block.params)


@pytest.mark.parametrize("block", range(1, len(BLOCKS)))
def test_each_extension_block_packs_the_ctypes_bytes(block):
    fmt, offset, packer = BLOCKS[block]
    first = sum(len(f.format) - 1 for f, _, _ in BLOCKS[:block])
    fields = flat_fields(KdaParams)[first:first + len(fmt.format) - 1]
    values = [(-1) ** i * (2 ** (31 + i % 3) - 7 * i) if code in "qP" else i + 1
              for i, code in enumerate(fmt.format[1:])]
    values = [abs(v) if code == "P" else v for v, code in zip(values, fmt.format[1:])]
    packed, reference = ParamBlock(), KdaParams()
    packer(packed.params, offset, *values)
    _set_fields(reference, fields, values)
    assert bytes(packed.params) == bytes(reference)


def test_a_scale_beyond_float32_would_reach_the_kernel_as_inf():
    """Why check_inputs refuses |scale| > FLOAT32_MAX (ctypes would store inf as well)."""
    block = ParamBlock()
    pack(block.params, 0, *(0,) * 16, 1e39, -5.0, 0)
    assert block.params.scale == float("inf")
    pack(block.params, 0, *(0,) * 16, checks.FLOAT32_MAX, -5.0, 0)
    assert block.params.scale == checks.FLOAT32_MAX


# ----------------------------------------------------------------------------------- stubbed device


def problem_tuple(args) -> tuple:
    return checks.check_inputs(**args).as_tuple()


@pytest.mark.parametrize("kw", [
    dict(), dict(state=torch.float32, final_state=torch.float32), dict(state=torch.bfloat16),
    dict(final_state=torch.bfloat16), dict(state=torch.bfloat16, final_state=torch.float32),
    dict(varlen=[0, 5, 5, 16]), dict(B=3, T=32, H=4, state=torch.float32), dict(T=0), dict(varlen=[0]),
])
def test_fast_check_takes_valid_contiguous_inputs_like_check_inputs(device, kw):
    args = inputs(**kw)
    assert checks.fast_check(**args)[:8] == problem_tuple(args)
    args.update(A_log=None, dt_bias=args["dt_bias"].flatten())
    assert checks.fast_check(**args)[:8] == problem_tuple(args)


def _bad_cases():
    """(argument overrides, exception, message pattern) of invalid inputs; every one must be
    refused by fast_check and raised by check_inputs."""
    bf = torch.bfloat16
    yield dict(k=torch.zeros(1, 16, 2, 128)), TypeError, r"k must be of dtype torch.bfloat16"
    yield dict(v=torch.zeros(1, 16, 2, 64, dtype=bf)), ValueError, r"v must be 4-D \[B, T, H, V\] with V = 128"
    yield dict(g=torch.zeros(1, 15, 2, 128, dtype=bf)), ValueError, r"g must be of shape \[1, 16, 2, 128\]"
    yield dict(beta=torch.zeros(1, 16, 2, 1, dtype=bf)), ValueError, r"beta must be of shape \[1, 16, 2\]"
    yield dict(beta=torch.zeros(1, 16, 2)), TypeError, r"beta must be of dtype torch.bfloat16"
    yield dict(out=torch.zeros(1, 16, 2, 128)), TypeError, r"out must be of dtype torch.bfloat16"
    yield (dict(out=torch.empty(1, 2, 16, 128, dtype=bf).transpose(1, 2)), ValueError,
           r"out must be contiguous")
    yield dict(A_log=torch.zeros(3)), ValueError, r"A_log must be of shape \[2\], got \[3\]"
    yield dict(A_log=torch.zeros(2, dtype=torch.float64)), TypeError, r"A_log must be of dtype torch.float32"
    yield dict(dt_bias=torch.zeros(2, 128, dtype=bf)), TypeError, r"dt_bias must be of dtype torch.float32"
    yield dict(dt_bias=torch.zeros(2, 64)), ValueError, r"dt_bias must be of shape \[2, 128\]"
    yield dict(dt_bias=[0.0] * 256), TypeError, r"dt_bias must be a torch.Tensor or None"
    yield dict(scale=float("nan")), ValueError, r"scale must be finite and within the float32 range"
    yield dict(scale=float("inf")), ValueError, r"scale must be finite and within the float32 range"
    yield dict(scale=True), TypeError, r"scale must be a real number \(float\), got bool True"
    yield dict(scale="0.1"), TypeError, r"scale must be a real number \(float\), got str '0.1'"
    yield dict(scale=[0.1]), TypeError, r"scale must be a real number \(float\), got list"
    yield dict(scale=0.1 + 0j), TypeError, r"scale must be a real number \(float\), got complex"
    yield dict(scale=10 ** 400), ValueError, r"scale must be finite and within the float32 range"
    yield dict(scale=1e39), ValueError, r"scale must be finite and within the float32 range"
    yield dict(lower_bound=True), TypeError, r"lower_bound must be a real number \(float\) or None, got bool"
    yield dict(lower_bound="-5"), TypeError, r"lower_bound must be a real number \(float\) or None, got str"
    yield dict(lower_bound=[-5.0]), TypeError, r"lower_bound must be a real number \(float\) or None, got list"
    yield dict(lower_bound=-5 + 0j), TypeError, r"lower_bound must be a real number \(float\) or None, got complex"
    in_range = r"lower_bound must be None \(the softplus gate\) or a bounded gate's bound in \[-1e\+30, 0\]"
    yield dict(lower_bound=-10 ** 400), ValueError, in_range
    yield dict(lower_bound=0.5), ValueError, in_range
    yield dict(lower_bound=float("nan")), ValueError, in_range
    yield (dict(initial_state=torch.zeros(1, 2, 128, 128, dtype=torch.float16)), TypeError,
           r"initial_state must be bfloat16 or float32")
    yield dict(final_state=torch.zeros(2, 2, 128, 128)), ValueError, r"final_state must be of shape \[1, 2, 128, 128\]"
    yield (dict(final_state=torch.zeros(1, 2, 128, 128).transpose(2, 3)), ValueError,
           r"final_state must be contiguous")
    yield dict(initial_state=torch.zeros(1, 2, 128, 128).numpy()), TypeError, r"initial_state must be a torch.Tensor"
    yield dict(cu_seqlens=torch.tensor([0.0, 16.0])), TypeError, r"cu_seqlens must be int32 or int64"
    yield dict(cu_seqlens=torch.tensor([[0, 16]])), ValueError, r"cu_seqlens must be 1-D"
    yield dict(cu_seqlens=torch.zeros(0, dtype=torch.int64)), ValueError, r"cu_seqlens must be 1-D"
    yield dict(q=torch.zeros(16, 2, 128, dtype=bf)), ValueError, r"q must be 4-D \[B, T, H, K\]"
    yield dict(q=torch.zeros(1, 16, 2, 64, dtype=bf)), ValueError, r"head dim K = 128"
    yield dict(q=np.zeros((1, 16, 2, 128))), TypeError, r"q must be a torch.Tensor"
    yield dict(k=None), TypeError, r"k must be a torch.Tensor"


@pytest.mark.parametrize("over,exc,pattern", list(_bad_cases()))
def test_bad_input_is_refused_by_fast_check_and_named_by_fwd(device, over, exc, pattern):
    args = inputs()
    args.update(over)
    assert checks.fast_check(**args) is None
    with pytest.raises(exc, match=pattern):
        flash_kda.fwd(**args)
    assert device[1] == []  # nothing launched


@pytest.mark.parametrize("name", ["k", "v", "beta", "out", "A_log", "dt_bias", "final_state", "cu_seqlens"])
def test_a_tensor_on_another_device_is_refused(device, name):
    args = inputs(final_state=torch.float32, varlen=[0, 16])
    device[0][id(args[name])] = 1
    assert checks.fast_check(**args) is None
    with pytest.raises(ValueError, match=rf"{name} must be on the device of q \(cuda:0\)"):
        flash_kda.fwd(**args)


def test_cpu_tensors_are_refused_by_both_checkers():
    args = inputs()
    assert checks.fast_check(**args) is None
    with pytest.raises(ValueError, match=r"q must be a CUDA tensor, got a tensor on cpu"):
        flash_kda.fwd(**args)


def test_varlen_needs_batch_one(device):
    args = inputs(B=2, varlen=[0, 16])
    assert checks.fast_check(**args) is None
    with pytest.raises(ValueError, match=r"batch size 1 when cu_seqlens is given"):
        flash_kda.fwd(**args)


def test_fwd_packs_pointers_sizes_and_scalars(device):
    args = inputs(B=2, T=32, H=3, state=torch.float32, final_state=torch.bfloat16)
    assert flash_kda.fwd(**args) is args["out"]
    (spec, blocks, stream, _), = device[1]
    p = launch_params(device[1][0])
    for name in POINTER_FIELDS[:-1]:
        assert p[name] == args[name].data_ptr(), name
    assert p["cu_seqlens"] is None and p["cu_seqlens_int64"] == 0
    assert (p["total_tokens"], p["seq_len"], p["num_heads"], p["num_seqs"]) == (64, 32, 3, 2)
    assert p["scale"] == pytest.approx(0.1) and p["lower_bound"] == -5.0
    assert (spec.state_in, spec.state_out, spec.v_block) == ("fp32", "bf16", 32)
    assert blocks == 2 * 3 * spec.splits and stream == "stream"


@pytest.mark.parametrize("dtype,flag", [(torch.int32, 0), (torch.int64, 1)])
def test_varlen_packs_offsets_and_their_width(device, dtype, flag):
    args = inputs(varlen=[0, 3, 16], state=torch.float32)
    args["cu_seqlens"] = args["cu_seqlens"].to(dtype)
    args["final_state"] = args["initial_state"]  # in-place state update
    flash_kda.fwd(**args, v_block=64)
    (spec, blocks, _, _), = device[1]
    p = launch_params(device[1][0])
    assert p["cu_seqlens"] == args["cu_seqlens"].data_ptr() and p["cu_seqlens_int64"] == flag
    assert p["initial_state"] == p["final_state"] == args["initial_state"].data_ptr()
    assert (p["total_tokens"], p["num_seqs"]) == (16, 2)
    assert (spec.state_in, spec.state_out, spec.v_block) == ("fp32", "fp32", 64)
    assert blocks == 2 * 2 * 2


@pytest.mark.parametrize("lb,T,v_block,gate,packed", [
    (None, 16, 128, "softplus", 0.0), (None, 16, 32, "softplus", 0.0), (None, 1, None, "softplus", 0.0),
    (-5.0, 16, 128, "bounded", -5.0), (-8.0, 16, 128, "bounded_wide", -8.0), (-8.0, 16, 32, "bounded_wide", -8.0),
    (-1e4, 1, None, "bounded", -1e4), (-1e4, 4, None, "bounded", -1e4)])
def test_the_gate_picks_its_kernel(device, lb, T, v_block, gate, packed):
    """lower_bound selects the gate kind (spec.gate_kind); the decode kernel's bounded build serves every
    bound; softplus packs a 0 bound (unused). (The general gates' widths per arch: test_arch.py.)"""
    args = inputs(T=T)
    args["lower_bound"] = lb
    flash_kda.fwd(**args, v_block=v_block)
    (spec, _, _, _), = device[1]
    p = launch_params(device[1][0])
    assert spec.gate == gate and p["lower_bound"] == pytest.approx(packed)
    if T == 16:
        assert spec.v_block == v_block  # the stub is an sm_90a
    else:
        assert spec.kind == "decode"


@pytest.mark.parametrize("units,v_block", [(1, 32), (33, 32), (34, 64), (461, 64), (462, 128), (600, 128)])
def test_v_block_follows_the_thresholds(device, units, v_block):
    flash_kda.fwd(**inputs(B=units, H=1))
    (spec, blocks, _, _), = device[1]
    assert spec.v_block == v_block and blocks == units * spec.splits


@pytest.mark.parametrize("variant", ["clustered", "portable"])
def test_choose_v_block_keeps_the_sweep_rule(monkeypatch, variant):
    monkeypatch.setenv("FLASH_KDA_KERNEL", variant)
    api.reset_variant()
    monkeypatch.setattr(api, "_sm_count", lambda index: 132)
    monkeypatch.setattr(api, "device_arch", lambda index: "sm_90a")
    try:
        for units in range(1, 600):
            if variant == "clustered":
                expected = 128 if units * 2 >= 132 * 7 else 32 if units * 4 <= 132 else 64
            else:  # the narrowest width whose CTAs fit in one wave
                expected = 32 if units * 4 <= 132 else 64 if units * 2 <= 132 else 128
            assert api.choose_v_block(units, 99) == expected
    finally:
        api.reset_variant()


def test_a_bad_variant_setting_fails_the_first_launch_of_any_kernel(device, monkeypatch):
    """FLASH_KDA_KERNEL names the chunked kernel's variant; a wrong value fails a decode-only process too
    (its first launch), not only the first chunked one."""
    monkeypatch.setenv("FLASH_KDA_KERNEL", "fast")
    api.chunk_variant.cache_clear()  # (the fixture's stubs stand in for the rest of reset_variant's caches)
    try:
        with pytest.raises(ValueError, match="FLASH_KDA_KERNEL must be one of clustered, portable"):
            flash_kda.fwd(**inputs(T=1))  # the token-by-token kernel
        assert not device[1]
    finally:
        api.chunk_variant.cache_clear()


def test_bad_v_block_is_refused_before_launch(device):
    with pytest.raises(ValueError, match=r"v_block must be one of \(32, 64, 128\), got 48"):
        flash_kda.fwd(**inputs(), v_block=48)
    with pytest.raises(TypeError, match=r"v_block must be None or an int in \(32, 64, 128\), got list"):
        flash_kda.fwd(**inputs(), v_block=[32])
    with pytest.raises(TypeError, match=r"v_block must be None or an int in \(32, 64, 128\), got float 64.0"):
        flash_kda.fwd(**inputs(), v_block=64.0)
    with pytest.raises(TypeError, match=r"v_block must be None or an int in \(32, 64, 128\), got bool"):
        flash_kda.fwd(**inputs(), v_block=True)
    assert device[1] == []


def test_numpy_integer_v_block_is_taken_as_an_int(device):
    flash_kda.fwd(**inputs(), v_block=np.int64(64))
    (spec, _, _, _), = device[1]
    assert spec.v_block == 64 and type(spec.v_block) is int


def test_empty_problems_launch_nothing(device):
    flash_kda.fwd(**inputs(varlen=[0]))
    flash_kda.fwd(**inputs(B=0))
    assert device[1] == []


def test_normalisable_inputs_are_copied_and_converted(device):
    args = inputs(state=torch.float32)
    q_strided = args["q"].transpose(1, 2).contiguous().transpose(1, 2)  # same shape, head-major strides
    k_misaligned = torch.zeros(1, 16, 2, 130, dtype=torch.bfloat16)[..., :128]  # rows 260 bytes apart
    k_misaligned.copy_(args["k"])
    args.update(q=q_strided, k=k_misaligned, dt_bias=torch.zeros(128, 2).t())
    args.update(scale=np.float64(0.25), lower_bound=-3)  # a float subclass, an int
    assert checks.fast_check(**args) is None
    flash_kda.fwd(**args)
    p = launch_params(device[1][0])
    assert p["q"] == q_strided.data_ptr()  # read in place, with its strides
    assert p["features"] & FEATURE_STRIDED and (p["ext.q.batch"], p["ext.q.token"], p["ext.q.head"]) == \
        q_strided.stride()[:3]
    assert p["k"] != k_misaligned.data_ptr() and p["ext.k.token"] == 2 * 128  # an aligned contiguous copy
    assert p["dt_bias"] != args["dt_bias"].data_ptr()  # contiguous copy
    assert p["v"] == args["v"].data_ptr() and p["initial_state"] == args["initial_state"].data_ptr()
    assert (p["scale"], p["lower_bound"]) == (0.25, -3.0)


def test_env_flag_for_cu_seqlens_is_read_at_import(device, monkeypatch):
    monkeypatch.setenv("FLASH_KDA_CHECK_CU_SEQLENS", "1")
    assert checks.cu_seqlens_check_enabled() is checks.CHECK_CU_SEQLENS
    monkeypatch.setattr(checks, "CHECK_CU_SEQLENS", True)
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_kda.fwd(**inputs(varlen=[0, 9, 4, 16]))
    flash_kda.fwd(**inputs(varlen=[0, 9, 4, 16]), check_cu_seqlens=False)
    assert len(device[1]) == 1


def test_custom_op_carries_the_tuning_knobs():
    """Under torch.compile, fwd goes through torch.ops.flash_kda.fwd: v_block and
    check_cu_seqlens must survive that route."""
    schema = str(torch.ops.flash_kda.fwd.default._schema)
    assert "? v_block=None" in schema and "bool? check_cu_seqlens=None" in schema, schema


def _nested():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prototype-API warning of torch.nested
        return torch.nested.nested_tensor([torch.zeros(16, 2, 128, dtype=torch.bfloat16)] * 1)


@pytest.mark.parametrize("name,make,pattern", [
    ("q", _nested, r"q must be a dense \(strided\) torch.Tensor, got a nested tensor"),
    ("k", lambda: torch.zeros(1, 16, 2, 128, dtype=torch.bfloat16).to_sparse(),
     r"k must be a dense \(strided\) torch.Tensor, got a tensor of layout torch.sparse_coo"),
    ("initial_state", lambda: torch.zeros(1, 2, 128, 128).to_sparse(),
     r"initial_state must be a dense \(strided\) torch.Tensor, got a tensor of layout torch.sparse_coo"),
])
def test_nested_and_sparse_tensors_are_named(device, name, make, pattern):
    args = inputs()
    args[name] = make()
    assert checks.fast_check(**args) is None
    with pytest.raises(TypeError, match=pattern):
        flash_kda.fwd(**args)
    assert device[1] == []


def test_mixed_devices_name_every_offender(device):
    args = inputs()
    args["k"] = args["k"].to("meta")
    devices = device[0]
    devices[id(args["k"])] = -1  # meta: get_device() is -1, as on CPU
    devices[id(args["beta"])] = -1  # a CPU tensor among (stubbed) cuda:0 ones
    with pytest.raises(ValueError, match=r"k, beta must be on the device of q \(cuda:0\), got k on meta, beta on cpu"):
        flash_kda.fwd(**args)
    devices[id(args["q"])] = -1  # q itself on the CPU, the rest (but k and beta) on cuda:0
    with pytest.raises(ValueError, match=r"every tensor must be on one CUDA device, got q on cpu, k on meta, "
                                         r"beta on cpu \(and the others on cuda:0\)"):
        flash_kda.fwd(**args)
    assert device[1] == []


def test_errors_from_kda_name_kda(device):
    args = inputs()
    with pytest.raises(TypeError, match=r"^flash_kda\.kda: k must be of dtype torch.bfloat16"):
        flash_kda.kda(args["q"], args["k"].float(), args["v"], args["g"], args["beta"], lower_bound=-5.0)
    with pytest.raises(TypeError, match=r"^flash_kda\.kda: q must be a torch.Tensor, got ndarray"):
        flash_kda.kda(args["q"].float().numpy(), args["k"], args["v"], args["g"], args["beta"])
    with pytest.raises(ValueError, match=r"^flash_kda\.kda: lower_bound must be None \(the softplus gate\) or"):
        flash_kda.kda(args["q"], args["k"], args["v"], args["g"], args["beta"], lower_bound=0.5)
    with pytest.raises(TypeError, match=r"^flash_kda\.kda: v_block must be None or an int"):
        flash_kda.kda(args["q"], args["k"], args["v"], args["g"], args["beta"], v_block=32.0)
    assert device[1] == []
