"""Input validation (docs/contract.md, "Bad input") runs before any compile or launch; exercised here on CPU tensors."""
from __future__ import annotations

import pytest
import torch

import flash_kda
from flash_kda import checks

from kda_inputs import make_inputs


def call(**over):
    inp = make_inputs(1, 16, 2, device="cpu", seed=0)
    args = dict(q=inp["q"], k=inp["k"], v=inp["v"], g=inp["g"], beta=inp["beta"], scale=0.1,
                out=torch.empty_like(inp["v"]), A_log=inp["A_log"], dt_bias=inp["dt_bias"], lower_bound=-5.0,
                initial_state=None, final_state=None, cu_seqlens=None)
    args.update(over)
    return flash_kda.fwd(**args)


def test_cpu_tensors_are_rejected_with_the_device_named():
    with pytest.raises(ValueError, match=r"q must be a CUDA tensor, got a tensor on cpu"):
        call()


@pytest.mark.parametrize("name,bad,exc,pattern", [
    ("k", torch.zeros(1, 16, 2, 128), TypeError, r"k must be of dtype torch.bfloat16, got torch.float32"),
    ("v", torch.zeros(1, 16, 2, 64, dtype=torch.bfloat16), ValueError, r"v must be 4-D \[B, T, H, V\] with V = 128"),
    ("g", torch.zeros(1, 15, 2, 128, dtype=torch.bfloat16), ValueError, r"g must be of shape \[1, 16, 2, 128\]"),
    ("beta", torch.zeros(1, 16, 2, 1, dtype=torch.bfloat16), ValueError, r"beta must be of shape \[1, 16, 2\]"),
    ("A_log", torch.zeros(3), ValueError, r"A_log must be of shape \[2\], got \[3\]"),
    ("dt_bias", torch.zeros(2, 128, dtype=torch.bfloat16), TypeError, r"dt_bias must be of dtype torch.float32"),
    ("scale", float("nan"), ValueError, r"scale must be finite and within the float32 range"),
    ("initial_state", torch.zeros(1, 2, 128, 128, dtype=torch.float16), TypeError,
     r"initial_state must be bfloat16 or float32"),
    ("final_state", torch.zeros(2, 2, 128, 128), ValueError, r"final_state must be of shape \[1, 2, 128, 128\]"),
    ("cu_seqlens", torch.tensor([0.0, 16.0]), TypeError, r"cu_seqlens must be int32 or int64"),
    ("q", torch.zeros(16, 2, 128, dtype=torch.bfloat16), ValueError, r"q must be 4-D \[B, T, H, K\]"),
    ("q", torch.zeros(1, 16, 2, 64, dtype=torch.bfloat16), ValueError, r"head dim K = 128"),
])
def test_bad_arguments_name_argument_expectation_and_value(name, bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(**{name: bad})


def test_dt_bias_flat_is_accepted_by_the_checks():
    with pytest.raises(ValueError, match="CUDA tensor"):  # passes every other check
        call(dt_bias=torch.zeros(2 * 128))


def test_varlen_requires_batch_one():
    inp = make_inputs(2, 16, 2, device="cpu")
    with pytest.raises(ValueError, match=r"batch size 1 when cu_seqlens is given"):
        call(q=inp["q"], k=inp["k"], v=inp["v"], g=inp["g"], beta=inp["beta"], out=torch.empty_like(inp["v"]),
             cu_seqlens=torch.tensor([0, 16]))


def test_non_contiguous_out_is_rejected():
    out = torch.empty(1, 2, 16, 128, dtype=torch.bfloat16).transpose(1, 2)
    with pytest.raises(ValueError, match=r"out must be contiguous"):
        call(out=out)


@pytest.mark.parametrize("lb", [0.5, float("nan"), float("-inf"), -1e31, 1e-30])
def test_lower_bound_out_of_range_is_named(lb):
    with pytest.raises(ValueError, match=r"lower_bound must be None \(the softplus gate\) or .*at most 0.*got"):
        call(lower_bound=lb)


@pytest.mark.parametrize("lb, gate", [(None, "softplus"), (0.0, "bounded"), (-5.0, "bounded"),
                                      (-5.0001, "bounded_wide"), (-1e4, "bounded_wide"), (-1e30, "bounded_wide")])
def test_every_gate_is_accepted_and_picks_its_kind(lb, gate):
    from flash_kda.jit.spec import gate_kind
    assert checks.check_lower_bound(lb) == lb
    assert gate_kind(lb) == gate


def test_cu_seqlens_value_check():
    checks.validate_cu_seqlens(torch.tensor([0, 3, 3, 10]), 10)
    with pytest.raises(ValueError, match="non-decreasing"):
        checks.validate_cu_seqlens(torch.tensor([0, 5, 3]), 10)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must be <= T = 10"):
        checks.validate_cu_seqlens(torch.tensor([0, 11]), 10)
    with pytest.raises(ValueError, match=r"cu_seqlens\[0\] must be >= 0"):
        checks.validate_cu_seqlens(torch.tensor([-1, 4]), 10)
