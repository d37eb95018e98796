"""Cold-start costs on this machine (no GPU needed): NVRTC vs nvcc per specialisation, and
precompiling every specialisation into an empty cache.
Usage: python benchmarks/compile_times.py [--arch TARGET ...]  (default: the visible GPUs' targets,
sm_90a without one; 'all' for every target, as CI compiles them)"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import flash_kda
from flash_kda.jit import KernelSpec, get_compiler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="target arch or 'all' (repeatable)")
    archs = parser.parse_args().arch
    samples = [KernelSpec("fp32", "fp32", v_block=128), KernelSpec("bf16", "fp32", v_block=64),
               KernelSpec("bf16", "bf16", v_block=32, gate="softplus")]
    print(f"CPU cores: {os.cpu_count()}\n")
    print("| compiler | seconds per specialisation (median of 3 specs) |")
    print("|---|---:|")
    for name in ("nvrtc", "nvcc"):
        comp = get_compiler(name)
        times = []
        for spec in samples:
            start = time.perf_counter()
            comp.compile(spec)
            times.append(time.perf_counter() - start)
        major, minor = comp.version()
        print(f"| {name} (CUDA {major}.{minor}) | {statistics.median(times):.2f} |")
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        entries = flash_kda.precompile(archs=archs, cache_dir=cache)
        took = time.perf_counter() - start
        size = sum(e.size for e in entries)
    targets = ", ".join(sorted({e.spec.arch for e in entries}))
    print(f"\nprecompile all {len(entries)} specialisations for {targets} (NVRTC, {os.cpu_count()} processes): "
          f"{took:.1f} s, "
          f"{size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
