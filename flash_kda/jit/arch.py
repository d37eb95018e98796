"""The GPU architectures flash_kda compiles for: one table, asked by everything else.

Each entry names the compiler target, the compute capability that runs it, and what the kernels
may use there. Adding an architecture is one row here plus its tuning where the kernels differ.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    target: str                   # --gpu-architecture for NVRTC / nvcc's code=, e.g. "sm_90a"
    capability: tuple[int, int]   # the compute capability that runs the cubin
    clusters: bool                # thread-block clusters and distributed shared memory
    max_smem_per_block: int       # bytes of dynamic shared memory one block may opt into
    gpus: str                     # for messages and `python -m flash_kda info`


ARCHS: dict[str, Arch] = {arch.target: arch for arch in (
    Arch("sm_90a", (9, 0), clusters=True, max_smem_per_block=227 * 1024, gpus="H100, H200, H800, H20"),
)}
DEFAULT_TARGETS: tuple[str, ...] = tuple(ARCHS)


def virtual_target(target: str) -> str:
    """The PTX (virtual) architecture of a real target: sm_90a -> compute_90a."""
    return target.replace("sm_", "compute_")


def supported_targets() -> str:
    return ", ".join(ARCHS)


def check_target(target: object) -> Arch:
    """The table entry for ``target``; a ValueError that names the likely mistake otherwise."""
    if not isinstance(target, str):
        raise TypeError(f"flash_kda: an arch must be a target name such as 'sm_90a', got {target!r}")
    arch = ARCHS.get(target)
    if arch is not None:
        return arch
    hint = ""
    if target + "a" in ARCHS:
        hint = (f" (did you mean {target}a? The kernels use architecture-specific features, which the "
                "'a' targets enable)")
    elif target.startswith("compute_"):
        hint = f" (give the real target, e.g. {target.replace('compute_', 'sm_')}, not the virtual one)"
    raise ValueError(f"flash_kda: unsupported arch {target!r}{hint}; supported: {supported_targets()}")


def arch_for_capability(major: int, minor: int) -> Arch | None:
    for arch in ARCHS.values():
        if arch.capability == (major, minor):
            return arch
    return None
