"""Bake the kernel cache ahead of time, without a GPU (for deployment images)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .jit import KernelCache, KernelSpec, all_specs, build, get_compiler
from .jit.cache import cache_key

log = logging.getLogger("flash_kda")


@dataclass(frozen=True)
class CompiledEntry:
    spec: KernelSpec
    path: Path
    size: int
    compiled: bool  # False when the entry was already in the cache
    seconds: float


def precompile(archs: Iterable[str] = ("sm_90a",), cache_dir: str | os.PathLike | None = None,
               specs: Iterable[KernelSpec] | None = None, compiler: str | None = None, workers: int | None = None,
               progress: Callable[[CompiledEntry, int, int], None] | None = None) -> list[CompiledEntry]:
    """Compile every specialisation (or ``specs``) for ``archs`` into the cache; return what is there.

    Entries already cached are reported as such; misses compile in ``workers`` processes
    (NVRTC holds the GIL), so this needs no GPU and no driver."""
    archs = tuple(archs)
    todo = list(specs) if specs is not None else list(all_specs(archs))
    cache = KernelCache(cache_dir)
    comp = get_compiler(compiler)
    results: dict[KernelSpec, CompiledEntry] = {}
    missing = []
    for spec in todo:
        found = cache.lookup(spec, cache_key(spec, comp.identity(spec)))
        if found is None:
            missing.append(spec)
        else:
            results[spec] = CompiledEntry(spec, found[1], len(found[0]), False, 0.0)
            if progress is not None:
                progress(results[spec], len(results), len(todo))
    workers = max(1, min(len(missing), workers or os.cpu_count() or 1))
    if missing:
        ctx = multiprocessing.get_context("spawn")  # safe even if the caller initialised CUDA
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_compile_one, spec, str(cache.directory), comp.name) for spec in missing]
            for future in futures:
                entry = future.result()
                results[entry.spec] = entry
                if progress is not None:
                    progress(entry, len(results), len(todo))
    log.info("flash_kda: precompiled %d entries into %s", len(results), cache.directory)
    return [results[spec] for spec in todo]


def _compile_one(spec: KernelSpec, cache_dir: str, compiler: str) -> CompiledEntry:
    start = time.perf_counter()
    cubin, path, compiled = build(spec, cache=KernelCache(cache_dir), compiler=get_compiler(compiler),
                                  allow_build=True)
    return CompiledEntry(spec, path, len(cubin), compiled, time.perf_counter() - start)
