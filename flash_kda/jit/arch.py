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
    clusters: bool                # the clustered chunk kernel runs here (clusters, DSMEM, bulk copies)
    max_smem_per_block: int       # bytes of dynamic shared memory one block may opt into
    producer_warps: int           # the chunked kernel's producer warps a CTA: 4, or 2 where ~100 KB must do
    gpus: str                     # for messages and `python -m flash_kda info`
    validated: str                # where it ran here: a GPU, or "compile-checked only" (README support table)
    # The chunked kernel's producer warps recompute their lane-, warp- and slot-derived addresses every
    # chunk (Config's PRODUCER_REMAT, kda_chunk_layout.cuh): Blackwell's ptxas spilled 16-52 bytes of
    # them from the general gates' producers at 255 registers otherwise (NVRTC 13.5); sm_90a's does not.
    producer_remat: bool = False
    # Warpgroups can hand registers to each other (setmaxnreg: the 'a' targets of Hopper and datacenter
    # Blackwell). The general gates' 128-wide chunked kernel needs it: its producers take 232 registers a
    # thread from the consumers' share of a 384-thread CTA (kda_fwd.cuh), and spill at 168 otherwise.
    register_reallocation: bool = False
    # The decode kernel's streamed build: 5 CTAs an SM (96 registers) where it was measured (sm_90a); 4
    # (128) elsewhere, where ptxas spills at 96 (sm_86, sm_120a, sm_121a).
    streamed_decode_ctas_per_sm: int = 4


_KB = 1024
# sm_120 / sm_121 have clusters, but the clustered slot ring (8 slots) does not fit their 99 KB a block.
ARCHS: dict[str, Arch] = {arch.target: arch for arch in (
    Arch("sm_80", (8, 0), False, 163 * _KB, 4, "A100, A800, A30", "compile-checked only"),
    Arch("sm_86", (8, 6), False, 99 * _KB, 2, "A10, A40, RTX A6000, RTX 30", "compile-checked only"),
    Arch("sm_89", (8, 9), False, 99 * _KB, 2, "L4, L40S, RTX 6000 Ada, RTX 40", "compile-checked only"),
    Arch("sm_90a", (9, 0), True, 227 * _KB, 4, "H100, H200, H800, H20", "H100 (both variants)",
         register_reallocation=True, streamed_decode_ctas_per_sm=5),
    Arch("sm_100a", (10, 0), True, 227 * _KB, 4, "B200, GB200", "compile-checked only", producer_remat=True,
         register_reallocation=True),
    Arch("sm_103a", (10, 3), True, 227 * _KB, 4, "B300, GB300", "compile-checked only", producer_remat=True,
         register_reallocation=True),
    Arch("sm_120a", (12, 0), False, 99 * _KB, 2, "RTX PRO 6000 Blackwell, RTX 50", "compile-checked only",
         producer_remat=True),
    Arch("sm_121a", (12, 1), False, 99 * _KB, 2, "DGX Spark (GB10)", "compile-checked only", producer_remat=True),
)}
ALL_TARGETS: tuple[str, ...] = tuple(ARCHS)
# Where the kernels were tuned and are tested on hardware; the arch of a spec made without one.
REFERENCE_TARGET = "sm_90a"
# The variants of the chunked kernel (FLASH_KDA_KERNEL): "clustered" needs Arch.clusters.
VARIANTS = ("clustered", "portable")


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


def visible_targets() -> tuple[str, ...]:
    """The targets of the visible GPUs (the supported ones), or the reference target when none is
    visible: what ``precompile`` and ``verify`` cover when no arch is given."""
    try:
        import torch
        capabilities = ([torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
                        if torch.cuda.is_available() else [])
    except Exception:  # noqa: BLE001 - no usable CUDA runtime: as if no GPU were visible
        capabilities = []
    found = [arch.target for arch in (arch_for_capability(*cap) for cap in capabilities) if arch is not None]
    return tuple(dict.fromkeys(found)) or (REFERENCE_TARGET,)
