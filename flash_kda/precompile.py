"""Bake the kernel cache ahead of time, without a GPU (for deployment images)."""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .jit import KernelCache, KernelSpec, all_specs, build, get_compiler

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

    Runs NVRTC in threads (it releases the GIL); needs no GPU and no driver."""
    archs = tuple(archs)
    todo = list(specs) if specs is not None else list(all_specs(archs))
    cache = KernelCache(cache_dir)
    comp = get_compiler(compiler)
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    done: list[CompiledEntry] = []

    def one(spec: KernelSpec) -> CompiledEntry:
        start = time.perf_counter()
        cubin, path, compiled = build(spec, cache=cache, compiler=comp, allow_build=True)
        return CompiledEntry(spec, path, len(cubin), compiled, time.perf_counter() - start)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for entry in pool.map(one, todo):
            done.append(entry)
            if progress is not None:
                progress(entry, len(done), len(todo))
    log.info("flash_kda: precompiled %d entries into %s", len(done), cache.directory)
    return done
