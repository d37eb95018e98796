"""Command line: ``python -m flash_kda {precompile,verify,info,clear-cache}``.

A user error (a bad argument, an unwritable cache, a failed compile) prints one line on stderr
and exits 1; FLASH_KDA_LOG_LEVEL=DEBUG adds the traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .jit.arch import ARCHS, REFERENCE_TARGET


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of the usage block
        self.exit(2, f"flash_kda: error: {message} (see {self.prog} --help)\n")


def _compiler(args: argparse.Namespace):
    """The compiler --compiler names (so that messages name the option, not an environment variable)."""
    from .jit import get_compiler
    return get_compiler(args.compiler, selected_by=f"--compiler {args.compiler}") if args.compiler else None


def _progress(entry, i: int, n: int) -> None:
    state = "compiled" if entry.compiled else "cached"
    print(f"[{i:3d}/{n}] {state:8s} {entry.seconds:6.1f}s {entry.spec.name}", flush=True)


def _precompile(args: argparse.Namespace) -> int:
    from .jit import env_flag
    from .precompile import precompile

    if env_flag("FLASH_KDA_DISABLE_JIT"):  # compiles nothing: the verify of what is there
        print("FLASH_KDA_DISABLE_JIT=1: nothing is compiled; verifying the cache instead", flush=True)
        return _verify(args)
    start = time.perf_counter()
    entries = precompile(archs=args.arch, cache_dir=args.cache_dir, compiler=_compiler(args),
                         workers=args.jobs, progress=_progress)
    total = sum(e.size for e in entries)
    built = sum(e.compiled for e in entries)
    print(f"{len(entries)} entries ({built} compiled, {len(entries) - built} already cached), "
          f"{total / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .precompile import verify

    report = verify(archs=args.arch, cache_dir=args.cache_dir, compiler=_compiler(args))
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    other = f"; {report.other_entries} entries of other versions or compilers" if report.other_entries else ""
    print(f"{report.directory}: {report.present}/{report.expected} specialisations present and intact{other}; "
          f"{len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}")
    return 0 if report.ok else 1


def _info(args: argparse.Namespace) -> int:
    from importlib import metadata

    from . import __version__
    from .jit import KernelCache, get_compiler
    from .jit.arch import arch_for_capability
    from .jit.headers import include_dirs

    print(f"flash_kda {__version__}")
    for dist in ("torch", "cuda-bindings", "nvidia-cuda-nvrtc", "nvidia-cutlass", "nvidia-cuda-cccl",
                 "nvidia-cuda-runtime", "filelock"):
        try:
            print(f"  {dist}: {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"  {dist}: not installed")
    for name in ("nvrtc", "nvcc"):
        try:
            major, minor = get_compiler(name).version()
            print(f"  compiler {name}: CUDA {major}.{minor}")
        except Exception as exc:  # noqa: BLE001 - informational
            print(f"  compiler {name}: unavailable ({str(exc).splitlines()[0]})")
    try:
        print(f"  headers: {', '.join(include_dirs())}")
    except RuntimeError as exc:
        print(f"  headers: {exc}")
    print("  targets (the chunked kernel's variants; where each was run here):")
    for a in ARCHS.values():
        variants = "clustered (default) and portable" if a.clusters else "portable"
        print(f"    {a.target} (compute capability {a.capability[0]}.{a.capability[1]}: {a.gpus}): {variants}; "
              f"{a.validated}")
    try:
        import torch
        if torch.cuda.is_available():
            from .jit.runtime import driver_version
            major, minor = driver_version()
            print(f"  driver: CUDA {major}.{minor}")
            for i in range(torch.cuda.device_count()):
                cap = torch.cuda.get_device_capability(i)
                arch = arch_for_capability(*cap)
                if arch is None:
                    use = "not supported"
                else:
                    from .api import chunk_variant
                    try:
                        use = f"uses {arch.target}, {chunk_variant(arch.target)} variant"
                    except (ValueError, RuntimeError) as exc:  # a FLASH_KDA_KERNEL this arch cannot honour
                        use = f"uses {arch.target}; {exc}"
                print(f"  cuda:{i}: {torch.cuda.get_device_name(i)} (compute capability {cap[0]}.{cap[1]}): {use}")
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m flash_kda", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # the options several commands share, defined once
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--cache-dir", default=None,
                       help="cache directory (default: FLASH_KDA_CACHE_DIR or ~/.cache/flash_kda)")
    targets = argparse.ArgumentParser(add_help=False)
    targets.add_argument("--arch", action="append",
                         help=f"target arch, one of {', '.join(ARCHS)}, or 'all' (repeatable; default: the "
                              f"visible GPUs' targets, {REFERENCE_TARGET} when none is visible)")
    targets.add_argument("--compiler", choices=("nvrtc", "nvcc"), default=None,
                         help="nvrtc (default, or FLASH_KDA_COMPILER) or nvcc; part of the cache key")
    p = sub.add_parser("precompile", parents=[targets, cache],
                       help="compile every kernel specialisation into the cache (no GPU needed)")
    p.add_argument("--jobs", type=_positive_int, default=None, help="parallel compiles (default: CPU count)")
    p.set_defaults(func=_precompile)
    p = sub.add_parser("verify", parents=[targets, cache],
                       help="check a baked cache: every specialisation present, trusted and intact")
    p.set_defaults(func=_verify)
    p = sub.add_parser("info", parents=[cache], help="versions, compilers, targets, GPUs and the cache")
    p.set_defaults(func=_info)
    p = sub.add_parser("clear-cache", parents=[cache], help="remove every cached kernel")
    p.set_defaults(func=_clear)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("flash_kda: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line, not a traceback
        from .errors import CompileError, FlashKDAError
        from .logs import log
        if not isinstance(exc, (FlashKDAError, ValueError, TypeError, OSError)):
            raise
        message = exc.one_line() if isinstance(exc, FlashKDAError) else str(exc).splitlines()[0]
        if not message.startswith("flash_kda"):
            message = f"flash_kda: {message}"
        print(message, file=sys.stderr)
        if isinstance(exc, CompileError):
            for line in exc.first_errors()[1:]:
                print(f"  {line.strip()}", file=sys.stderr)
        if log.isEnabledFor(logging.DEBUG):
            import traceback
            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
