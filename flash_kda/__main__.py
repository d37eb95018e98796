"""Command line: ``python -m flash_kda {precompile,info,clear-cache}``."""
from __future__ import annotations

import argparse
import sys
import time


def _precompile(args: argparse.Namespace) -> int:
    from .precompile import precompile

    start = time.perf_counter()

    def show(entry, i, n):
        state = "compiled" if entry.compiled else "cached"
        print(f"[{i:3d}/{n}] {state:8s} {entry.seconds:6.1f}s {entry.spec.name}", flush=True)

    entries = precompile(archs=tuple(args.arch or ["sm_90a"]), cache_dir=args.cache_dir, compiler=args.compiler,
                         workers=args.jobs, progress=show)
    total = sum(e.size for e in entries)
    built = sum(e.compiled for e in entries)
    print(f"{len(entries)} entries ({built} compiled, {len(entries) - built} already cached), "
          f"{total / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s")
    return 0


def _info(args: argparse.Namespace) -> int:
    from importlib import metadata

    from . import __version__
    from .jit import KernelCache, get_compiler
    from .jit.headers import include_dirs

    print(f"flash_kda {__version__}")
    for dist in ("torch", "cuda-bindings", "nvidia-cuda-nvrtc", "nvidia-cutlass", "nvidia-cuda-cccl",
                 "nvidia-cuda-runtime"):
        try:
            print(f"  {dist}: {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"  {dist}: not installed")
    for name in ("nvrtc", "nvcc"):
        try:
            major, minor = get_compiler(name).version()
            print(f"  compiler {name}: CUDA {major}.{minor}")
        except Exception as exc:  # noqa: BLE001 - informational
            print(f"  compiler {name}: unavailable ({exc})")
    try:
        print(f"  headers: {', '.join(include_dirs())}")
    except RuntimeError as exc:
        print(f"  headers: {exc}")
    try:
        import torch
        if torch.cuda.is_available():
            from .jit.runtime import driver_version
            major, minor = driver_version()
            print(f"  driver: CUDA {major}.{minor}")
            for i in range(torch.cuda.device_count()):
                print(f"  cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})")
        else:
            print("  GPU: none visible")
    except Exception as exc:  # noqa: BLE001
        print(f"  GPU: unavailable ({exc})")
    cache = KernelCache(args.cache_dir)
    entries = cache.entries()
    print(f"  cache: {cache.directory} ({len(entries)} entries, {sum(p.stat().st_size for p in entries) / 1e6:.1f} MB)")
    return 0


def _clear(args: argparse.Namespace) -> int:
    from .jit import KernelCache

    cache = KernelCache(args.cache_dir)
    print(f"removed {cache.clear()} entries from {cache.directory}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_kda", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("precompile", help="compile every kernel specialisation into the cache (no GPU needed)")
    p.add_argument("--arch", action="append", help="target arch, e.g. sm_90a (repeatable)")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: FLASH_KDA_CACHE_DIR or ~/.cache/flash_kda)")
    p.add_argument("--compiler", choices=("nvrtc", "nvcc"), default=None)
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    p.set_defaults(func=_precompile)
    p = sub.add_parser("info", help="versions, GPUs and the cache")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_info)
    p = sub.add_parser("clear-cache", help="remove every cached kernel")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_clear)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
