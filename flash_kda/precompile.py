"""Bake the kernel cache ahead of time, without a GPU (deployment images), and verify a baked one.

``precompile`` writes into exactly the directory it is given: it never falls back to a private
directory (an image build must not succeed while writing nothing where it was asked to), and it
stops at the first failure (a compile error, a full disk) with that error. Under
FLASH_KDA_DISABLE_JIT=1 it compiles nothing and reports what is missing, like ``verify``.
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import stat
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import CacheMissError, FlashKDAError
from .jit import Compiler, KernelCache, all_specs, build, env_flag, get_compiler
from .jit.arch import ALL_TARGETS, check_target, visible_targets
from .jit.cache import cache_key, check_entry
from .jit.spec import AnySpec, EarlierSpecLayout, spec_from_dict
from .logs import log


@dataclass(frozen=True)
class CompiledEntry:
    spec: AnySpec
    path: Path
    size: int
    compiled: bool  # False when the entry was already in the cache
    seconds: float


def resolve_targets(archs: Iterable[str] | str | None) -> tuple[str, ...]:
    """Validated compiler targets; ``"all"`` means every target of the arch table, None the visible
    GPUs' targets (the reference target, sm_90a, when no GPU is visible)."""
    if archs is None:
        return visible_targets()
    names = [archs] if isinstance(archs, str) else list(archs)
    if not names:
        raise ValueError("flash_kda: give at least one arch")
    targets: list[str] = []
    for name in names:
        targets += ALL_TARGETS if name == "all" else [check_target(name).target]
    return tuple(dict.fromkeys(targets))


def _planned_entries(archs: Iterable[str] | str | None, specs: Iterable[AnySpec] | None,
                     compiler: str | Compiler | None) -> tuple[Compiler, list[tuple[AnySpec, str]]]:
    """The compiler and the (spec, cache key) of every entry ``precompile`` writes and ``verify`` expects."""
    targets = resolve_targets(archs)
    todo = list(specs) if specs is not None else list(all_specs(targets))
    comp = compiler if isinstance(compiler, Compiler) else get_compiler(compiler)
    digest = comp.header_digest()
    return comp, [(spec, cache_key(spec, comp.identity(spec), digest)) for spec in todo]


def _check_workers(workers: object) -> None:
    if workers is not None and (type(workers) is not int or workers < 1):
        raise ValueError(f"flash_kda: the number of parallel compiles (--jobs) must be an integer >= 1, got {workers!r}")


def precompile(archs: Iterable[str] | str | None = None, cache_dir: str | os.PathLike | None = None,
               specs: Iterable[AnySpec] | None = None, compiler: str | Compiler | None = None,
               workers: int | None = None,
               progress: Callable[[CompiledEntry, int, int], None] | None = None) -> list[CompiledEntry]:
    """Compile every specialisation (or ``specs``) for ``archs`` into the cache; return what is there.

    Entries already cached are reported as such; misses compile in ``workers`` processes (NVRTC
    holds the GIL), so this needs no GPU and no driver. Raises ``CacheWriteError`` when the
    directory cannot be written (before compiling anything), ``CompileError`` on the first failed
    compile, ``CacheMissError`` under FLASH_KDA_DISABLE_JIT=1 when something is missing."""
    _check_workers(workers)
    comp, planned = _planned_entries(archs, specs, compiler)
    todo = [spec for spec, _ in planned]
    cache = KernelCache(cache_dir, fallback=False)
    results: dict[AnySpec, CompiledEntry] = {}
    missing = []
    for spec, key in planned:
        found = cache.lookup(spec, key)
        if found is None:
            missing.append(spec)
        else:
            results[spec] = CompiledEntry(spec, found[1], len(found[0]), False, 0.0)
            if progress is not None:
                progress(results[spec], len(results), len(todo))
    if missing and env_flag("FLASH_KDA_DISABLE_JIT"):
        raise CacheMissError(
            f"flash_kda: FLASH_KDA_DISABLE_JIT=1, so precompile compiles nothing, and {len(missing)} of {len(todo)} "
            f"specialisations are missing from {cache.directory} (first: {missing[0].name}); "
            "python -m flash_kda verify lists them")
    if missing:
        cache.write_dir  # noqa: B018 - raises CacheWriteError now, before any compile, if it cannot be written
        for entry in _compile_in_workers(missing, cache.directory, comp.name, workers):
            results[entry.spec] = entry
            if progress is not None:
                progress(entry, len(results), len(todo))
    log.info("flash_kda: precompiled %d entries into %s", len(results), cache.directory)
    return [results[spec] for spec in todo]


def _compile_in_workers(specs: list[AnySpec], cache_dir: Path, compiler: str, workers: int | None):
    """Yield each spec's entry as its compile finishes; on the first failure cancel what has not
    started, wait for what has, and raise that failure."""
    workers = max(1, min(len(specs), workers or os.cpu_count() or 1))
    ctx = multiprocessing.get_context("spawn")  # safe even if the caller initialised CUDA
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(),))
    try:
        futures = [pool.submit(_compile_one, spec, str(cache_dir), compiler) for spec in specs]
        for future in as_completed(futures):
            try:
                yield future.result()
            except BrokenProcessPool as exc:
                raise FlashKDAError("flash_kda: a precompile worker process died (killed, or out of memory?); "
                                    "try fewer --jobs") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_environment() -> None:
    """Precompile workers compile with NVRTC's precompiled headers unless FLASH_KDA_JIT_PCH says otherwise;
    under FLASH_KDA_JIT_CHECK_SPILLS=1, past the CUDA compute cache, where NVRTC 13 would take the cubins
    an earlier compile left without the ptxas report the check reads (jit/compiler.py). Set before the
    worker's first NVRTC call."""
    os.environ.setdefault("FLASH_KDA_JIT_PCH", "1")
    if env_flag("FLASH_KDA_JIT_CHECK_SPILLS"):
        os.environ.setdefault("CUDA_CACHE_DISABLE", "1")


def _worker_init(parent_pid: int) -> None:
    """Precompile workers end with their parent, however it ends (each holds ~600 MB while compiling);
    their environment: _worker_environment."""
    _worker_environment()
    if sys.platform.startswith("linux"):
        try:  # PR_SET_PDEATHSIG: SIGKILL when the parent dies
            ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent_pid:  # it died before the line above ran
            os._exit(1)

    def watch() -> None:  # everywhere else (and belt and braces): poll for re-parenting
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="flash_kda-parent-watch").start()


def _compile_one(spec: AnySpec, cache_dir: str, compiler: str) -> CompiledEntry:
    start = time.perf_counter()
    cubin, path, compiled = build(spec, cache=KernelCache(cache_dir, fallback=False), compiler=get_compiler(compiler),
                                  allow_build=True)
    return CompiledEntry(spec, path, len(cubin), compiled, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    directory: Path
    expected: int                    # specialisations asked for
    present: int                     # of those, present, trusted and intact
    other_entries: int               # intact entries of other versions/compilers (not a problem)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(archs: Iterable[str] | str | None = None, cache_dir: str | os.PathLike | None = None,
           compiler: str | Compiler | None = None, specs: Iterable[AnySpec] | None = None) -> VerifyReport:
    """Check a baked cache without writing to it: every specialisation for ``archs`` is present, and
    every entry in the directory passes the trust rule, its identity and checksum checks, and can
    be read (by this user, and by everyone when the directory itself is world-readable)."""
    _, planned = _planned_entries(archs, specs, compiler)
    cache = KernelCache(cache_dir)
    expected = {cache.entry_path(spec, key): (spec, key) for spec, key in planned}
    report = VerifyReport(cache.directory, len(planned), 0, 0)
    problem = cache.untrusted_reason(cache.directory)
    if problem:
        report.problems.append(f"{cache.directory}: not trusted for loading: {problem}")
    shared = _world_readable(cache.directory)
    on_disk = set(cache.entries()) | {p.with_suffix(".cubin") for p in cache.directory.glob("kda_*/*.json")}
    for path in sorted(on_disk):
        if path in expected:
            spec, key = expected[path]
        else:
            try:
                spec, key = _spec_of(path)
            except EarlierSpecLayout:
                report.other_entries += 1  # never loaded: another name and key than any entry of this version
                continue
            if spec is None:
                report.problems.append(f"{path}: {key}")
                continue
        problem = cache.untrusted_reason(cache.directory, path) or check_entry(path, spec, key).problem
        if problem is None and shared and not all(_world_readable(p) for p in (path, path.with_suffix(".json"))):
            problem = "not readable by other users, although its cache directory is (re-bake with umask 022)"
        if problem is not None:
            report.problems.append(f"{path}: {problem}")
        elif path in expected:
            report.present += 1
        else:
            report.other_entries += 1
    for path, (spec, _) in expected.items():
        if path not in on_disk:
            report.problems.append(f"{path}: missing ({spec.name})")
    return report


def _spec_of(cubin_path: Path) -> tuple[AnySpec | None, str]:
    """The spec and key an entry of another version claims (or None and why it cannot be read).
    Raises EarlierSpecLayout for an entry that another flash_kda version wrote in its own layout: its
    metadata's fields or values, or the name of its directory (an earlier version named specs otherwise)."""
    try:
        meta = json.loads(cubin_path.with_suffix(".json").read_text())
        spec = spec_from_dict(meta["spec"])
    except EarlierSpecLayout:
        raise  # a ValueError, but not an unreadable entry: the caller counts it as another version's
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return None, f"unreadable metadata ({exc})"
    if cubin_path.stem != meta.get("key"):
        return None, f"holds another kernel: its metadata names {spec.name} with key {meta.get('key')!r}"
    if cubin_path.parent.name != spec.name:  # its own key, in a directory named as another version names specs
        raise EarlierSpecLayout(f"named by another flash_kda version ({cubin_path.parent.name}; this one: {spec.name})")
    return spec, meta["key"]


def _world_readable(path: Path) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
    return mode & need == need
