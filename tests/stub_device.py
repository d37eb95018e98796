"""A stubbed CUDA device for the host-side tests on the CPU machine: CPU tensors pass for cuda:0, and
the kernel launch records its grid and parameter bytes instead of running."""
from __future__ import annotations

import ctypes

import pytest
import torch

from flash_kda import api
from flash_kda.jit.params import KdaParams, flat_fields

from kda_inputs import make_inputs


class FakeKernel:
    """Stands in for LoadedKernel: records each launch as (spec, CTAs in all, stream, parameter bytes) in
    ``launches`` and its grid (x, y, z) in ``grids``."""

    def __init__(self, spec, launches: list, grids: list):
        self.spec, self._launches, self._grids = spec, launches, grids

    def launch(self, grid_x: int, grid_y: int, grid_z: int, stream, params_address: int) -> None:
        params = ctypes.c_void_p.from_address(params_address).value
        self._launches.append((self.spec, grid_x * grid_y * grid_z, stream, KdaParams.from_buffer_copy(
            ctypes.string_at(params, ctypes.sizeof(KdaParams)))))
        self._grids.append((grid_x, grid_y, grid_z))

    launch_in_own_context = launch


@pytest.fixture
def device(monkeypatch):
    """CPU tensors pass for cuda:0 (or the index set in the returned dict, by id of the tensor);
    the kernel, stream and SM-count lookups are stubbed. Yields (devices, launches, grids)."""
    devices: dict[int, int] = {}
    launches: list = []
    grids: list = []
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: devices.get(id(self), 0))
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1234, raising=False)
    monkeypatch.setattr(api, "_streams", {1234: "stream"})
    monkeypatch.setattr(api, "_launchers", {})
    monkeypatch.setattr(api, "_v_block_thresholds", lambda index: (462, 34))  # 132 SMs
    monkeypatch.setattr(api, "_decode_one_wave_units",
                        lambda index: (7 * 132 // 8, 6 * 132 // 4, 5 * 132 // 2))  # 132 SMs
    monkeypatch.setattr(api, "device_arch", lambda index: "sm_90a")
    monkeypatch.setattr(api, "get_kernel", lambda spec, index: FakeKernel(spec, launches, grids))
    yield devices, launches, grids


def inputs(B=1, T=16, H=2, state=None, varlen=None, final_state=None):
    inp = make_inputs(B, T, H, device="cpu", seed=3)
    N = B if varlen is None else len(varlen) - 1
    args = dict(q=inp["q"], k=inp["k"], v=inp["v"], g=inp["g"], beta=inp["beta"], scale=0.1,
                out=torch.empty_like(inp["v"]), A_log=inp["A_log"], dt_bias=inp["dt_bias"], lower_bound=-5.0,
                initial_state=None if state is None else torch.zeros(N, H, 128, 128, dtype=state),
                final_state=None if final_state is None else torch.zeros(N, H, 128, 128, dtype=final_state),
                cu_seqlens=None if varlen is None else torch.tensor(varlen))
    return args


def launch_params(launch) -> dict:
    """Every field of a launch's parameters, nested ones as 'ext.q.token'."""
    params, values = launch[3], {}
    for name, _ in flat_fields(KdaParams):
        value = params
        for part in name.split("."):
            value = getattr(value, part)
        values[name] = value
    return values
