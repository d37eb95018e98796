"""The JIT: specialisation -> source -> compiler -> on-disk cache -> loaded kernel -> launch.

``get_kernel`` is the only entry the hot path uses; after the first call per (spec,
device) it is one dict lookup.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..errors import CacheMissError, CompileError
from .cache import KernelCache, cache_key, default_cache_dir
from .compiler import Compiler, get_compiler
from .env import env_flag
from .runtime import LoadedKernel, check_compiler_fits_driver
from .spec import KernelSpec, all_specs

log = logging.getLogger("flash_kda.jit")

__all__ = ["KernelSpec", "all_specs", "build", "get_kernel", "KernelCache", "CompileError", "CacheMissError",
           "default_cache_dir", "get_compiler", "env_flag"]

_loaded: dict[tuple[KernelSpec, int], LoadedKernel] = {}
_lock = threading.Lock()


def build(spec: KernelSpec, cache: KernelCache | None = None, compiler: Compiler | None = None,
          allow_build: bool | None = None) -> tuple[bytes, Path, bool]:
    """The cubin for ``spec`` from the cache, compiling and publishing it on a miss.

    Returns (cubin, entry path, whether this call compiled it)."""
    cache = cache or KernelCache()
    compiler = compiler or get_compiler()
    identity = compiler.identity(spec)
    key = cache_key(spec, identity, compiler.header_digest())
    if allow_build is None:
        allow_build = not env_flag("FLASH_KDA_DISABLE_JIT")

    def compile_now() -> bytes:
        start = time.perf_counter()
        try:
            cubin = compiler.compile(spec)
        except CompileError as exc:
            raise CompileError(spec.name, compiler.name, exc.log, str(cache.entry_path(spec, key, cache.write_dir))) \
                from None
        log.info("flash_kda: compiled %s with %s in %.1f s", spec.name, identity, time.perf_counter() - start)
        return cubin

    # the precompile command that would fill this miss: the compiler is part of the key
    hint = f" --compiler {compiler.name}" if compiler.name != "nvrtc" else ""
    return cache.get_or_build(spec, key, compile_now, allow_build=allow_build, identity=identity, miss_hint=hint)


def get_kernel(spec: KernelSpec, device_index: int) -> LoadedKernel:
    """The loaded kernel for ``spec`` on ``cuda:device_index`` (compiled on first use)."""
    kernel = _loaded.get((spec, device_index))
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _loaded.get((spec, device_index))
        if kernel is None:
            _refuse_during_capture(spec)
            compiler = get_compiler()
            check_compiler_fits_driver(compiler.version(), compiler.name)
            cubin, path, _ = build(spec, compiler=compiler)
            kernel = LoadedKernel(spec, cubin, device_index)
            log.debug("flash_kda: %s ready on cuda:%d from %s", spec.name, device_index, path)
            _loaded[(spec, device_index)] = kernel
    return kernel


def _refuse_during_capture(spec: KernelSpec) -> None:
    """Compiling or loading a module is not allowed while a CUDA graph is being captured."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"flash_kda: the first call of {spec.name} happened during CUDA graph capture, where a kernel "
            "cannot be compiled or loaded. Call flash_kda.fwd once with the same kind of inputs before "
            "capturing (the usual warm-up), or precompile and warm up at start-up.")
