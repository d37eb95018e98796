"""Load a cubin into a device's primary context and launch it through the driver API."""
from __future__ import annotations

import ctypes
import functools
import logging

from .spec import KERNEL_NAME, KernelSpec

log = logging.getLogger("flash_kda.jit")


class CudaDriverError(RuntimeError):
    pass


def _driver():
    from cuda.bindings import driver
    return driver


def check(result, what: str):
    """Unpack a cuda-bindings result tuple, raising with the CUDA error name on failure."""
    driver = _driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        _, text = driver.cuGetErrorString(err)
        name = name.decode() if isinstance(name, bytes) else name
        text = text.decode() if isinstance(text, bytes) else text
        raise CudaDriverError(f"flash_kda: {what} failed with {name}: {text}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


@functools.lru_cache(maxsize=None)
def driver_version() -> tuple[int, int]:
    driver = _driver()
    check(driver.cuInit(0), "cuInit")
    version = check(driver.cuDriverGetVersion(), "cuDriverGetVersion")
    return version // 1000, (version % 1000) // 10


def check_compiler_fits_driver(compiler_version: tuple[int, int], compiler_name: str) -> None:
    """A cubin from CUDA major X loads on a driver of major >= X (minor-version compatibility)."""
    drv = driver_version()
    if compiler_version[0] > drv[0]:
        raise RuntimeError(
            f"flash_kda: the {compiler_name} compiler is CUDA {compiler_version[0]}.{compiler_version[1]} but the "
            f"driver supports CUDA {drv[0]}.{drv[1]}; its cubins would not load. Install a compiler of CUDA "
            f"{drv[0]}.x, e.g. pip install 'nvidia-cuda-nvrtc=={drv[0]}.*' 'cuda-bindings=={drv[0]}.*', "
            f"or upgrade the NVIDIA driver.")


def check_launch_registers(spec: KernelSpec, registers: int) -> None:
    """A kernel whose warpgroups move registers (setmaxnreg) counts on the registers a thread it is launched
    with: with fewer, a warpgroup's increase would wait forever. ptxas gives such a kernel its whole share
    (168 a thread at 384 threads); a compiler that did otherwise must fail here, not hang the GPU."""
    expected = spec.launch_registers
    if expected is not None and registers != expected:
        raise RuntimeError(
            f"flash_kda: {spec.name} was compiled to {registers} registers a thread, but its warpgroups move "
            f"registers (setmaxnreg) on the assumption of {expected}; launching it could hang. The compiler's "
            f"register allocation differs from the one this version was built with: report it, and run "
            f"v_block=64 meanwhile.")


class LoadedKernel:
    """One spec's cubin loaded on one device: the function handle plus its launch shape."""

    def __init__(self, spec: KernelSpec, cubin: bytes, device_index: int):
        driver = _driver()
        self.spec = spec
        self.device_index = device_index
        check(driver.cuInit(0), "cuInit")
        device = check(driver.cuDeviceGet(device_index), "cuDeviceGet")
        self._context = check(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
        check(driver.cuCtxPushCurrent(self._context), "cuCtxPushCurrent")
        try:
            self._module = check(driver.cuModuleLoadData(cubin), f"cuModuleLoadData({spec.name})")
            self.function = check(driver.cuModuleGetFunction(self._module, KERNEL_NAME.encode()),
                                  "cuModuleGetFunction")
            if getattr(spec, "launch_registers", None) is not None:
                check_launch_registers(spec, check(driver.cuFuncGetAttribute(
                    driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS, self.function), "cuFuncGetAttribute"))
            ptr, _ = check(driver.cuModuleGetGlobal(self._module, b"flash_kda_smem_bytes"), "cuModuleGetGlobal")
            smem = ctypes.c_uint32(0)
            check(driver.cuMemcpyDtoH(ctypes.addressof(smem), ptr, 4), "cuMemcpyDtoH")
            self.smem_bytes = int(smem.value)
            check(driver.cuFuncSetAttribute(
                self.function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                self.smem_bytes), "cuFuncSetAttribute(max dynamic shared memory)")
        finally:
            check(driver.cuCtxPopCurrent(), "cuCtxPopCurrent")
        self.threads = spec.threads
        self._launch = driver.cuLaunchKernel
        self._success = driver.CUresult.CUDA_SUCCESS
        log.debug("flash_kda: loaded %s on cuda:%d (%d B shared memory)", spec.name, device_index, self.smem_bytes)

    def launch(self, grid_x: int, grid_y: int, grid_z: int, stream, params_address: int) -> None:
        """Launch a grid of (grid_x, grid_y, grid_z) CTAs (the chunked kernel: 1-D; the token-by-token
        kernel: (CTAs a head, H, N))."""
        (err,) = self._launch(self.function, grid_x, grid_y, grid_z, self.threads, 1, 1, self.smem_bytes, stream,
                              params_address, 0)
        if err != self._success:
            driver = _driver()
            if err == driver.CUresult.CUDA_ERROR_INVALID_CONTEXT:
                # a thread on which nothing made the device's context current yet
                check(driver.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
                (err,) = self._launch(self.function, grid_x, grid_y, grid_z, self.threads, 1, 1, self.smem_bytes,
                                      stream, params_address, 0)
            check((err,), f"cuLaunchKernel({self.spec.name}, grid=({grid_x}, {grid_y}, {grid_z}))")

    def launch_in_own_context(self, grid_x: int, grid_y: int, grid_z: int, stream, params_address: int) -> None:
        """Launch with this kernel's device context pushed (the calling thread's current one is another GPU's)."""
        driver = _driver()
        check(driver.cuCtxPushCurrent(self._context), "cuCtxPushCurrent")
        try:
            self.launch(grid_x, grid_y, grid_z, stream, params_address)
        finally:
            check(driver.cuCtxPopCurrent(), "cuCtxPopCurrent")
