"""Kernel specialisations: one object names one binary and renders its source.

Everything fixed at compile time lives here (state dtypes, varlen, gate kind, head
dims, V-slice width, target arch); everything else is a run-time kernel argument.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from importlib import resources
from typing import Iterator

from .arch import DEFAULT_TARGETS, check_target

STATE_DTYPES = ("none", "bf16", "fp32")
_STATE_CODE = {"none": 0, "bf16": 1, "fp32": 2}  # kStateNone / kStateBF16 / kStateFP32
GATES = ("bounded",)
V_BLOCKS = (32, 64, 128)
HEAD_DIM = 128
PRODUCER_WARPS = 4  # per CTA (templates/kda_fwd.cuh, Config<VB>)
TEMPLATE = "kda_fwd.cuh"
KERNEL_NAME = "flash_kda_fwd_kernel"


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant of the KDA forward kernel."""

    state_in: str
    state_out: str
    varlen: bool
    gate: str = "bounded"
    head_k: int = HEAD_DIM
    head_v: int = HEAD_DIM
    v_block: int = 64
    arch: str = "sm_90a"

    def __post_init__(self) -> None:
        if self.state_in not in STATE_DTYPES or self.state_out not in STATE_DTYPES:
            raise ValueError(f"state dtypes must be in {STATE_DTYPES}, got {self.state_in!r}/{self.state_out!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if (self.head_k, self.head_v) != (HEAD_DIM, HEAD_DIM):
            raise ValueError(f"only K = V = {HEAD_DIM} is implemented, got K={self.head_k} V={self.head_v}")
        if type(self.v_block) is not int or self.v_block not in V_BLOCKS:
            raise ValueError(f"v_block must be one of {V_BLOCKS} (an int), got {self.v_block!r}")
        check_target(self.arch)

    @property
    def name(self) -> str:
        kind = "varlen" if self.varlen else "fixed"
        return (f"kda_fwd_{self.gate}_k{self.head_k}v{self.head_v}_vb{self.v_block}_"
                f"in-{self.state_in}_out-{self.state_out}_{kind}_{self.arch}")

    def identity_tag(self) -> bytes:
        """Bytes every cubin of this spec carries (``source`` embeds them), so the cache can tell a
        cubin that belongs to another specialisation even when its metadata was made to match."""
        return f"flash_kda_spec:{self.name}".encode()

    @property
    def threads(self) -> int:
        return (self.v_block // 16 + PRODUCER_WARPS) * 32

    @property
    def splits(self) -> int:
        """CTAs per (sequence, head): the value axis is cut into this many slices."""
        return self.head_v // self.v_block

    @property
    def cluster(self) -> int:
        """CTAs per thread-block cluster: pairs of a head's V-slices share each chunk's preparation
        through distributed shared memory (templates/kda_fwd.cuh, Config<VB>::kCluster)."""
        return min(self.splits, 2)

    def source(self) -> str:
        """The translation unit that instantiates the template for this spec."""
        args = (f"{self.v_block}, {_STATE_CODE[self.state_in]}, {_STATE_CODE[self.state_out]}, "
                f"{'true' if self.varlen else 'false'}")
        cluster = f"__cluster_dims__({self.cluster}, 1, 1) " if self.cluster > 1 else ""
        return (
            f'#include "{TEMPLATE}"\n'
            f"// {self.name}\n"
            f"static_assert(flash_kda::Config<{self.v_block}>::kThreads == {self.threads} && "
            f"flash_kda::Config<{self.v_block}>::kCluster == {self.cluster}, "
            f'"spec.py and the template disagree on the launch shape");\n'
            f'extern "C" __global__ void __launch_bounds__({self.threads}, 1) {cluster}\n'
            f"{KERNEL_NAME}(const flash_kda::KdaParams p) {{\n"
            f"  flash_kda::kda_fwd<{args}>(p);\n"
            f"}}\n"
            f'extern "C" __device__ unsigned int flash_kda_smem_bytes = '
            f"sizeof(flash_kda::SharedStorage<{self.v_block}>);\n"
            f'extern "C" __device__ const char flash_kda_spec[] = "{self.identity_tag().decode()}";\n'
        )


def template_sources() -> dict[str, str]:
    """Every template file shipped in the package, by include name."""
    root = resources.files("flash_kda") / "templates"
    return {entry.name: entry.read_text() for entry in sorted(root.iterdir(), key=lambda e: e.name)
            if entry.name.endswith((".cuh", ".h"))}


def all_specs(archs: tuple[str, ...] = DEFAULT_TARGETS) -> Iterator[KernelSpec]:
    """Every specialisation the library may launch, for the given archs."""
    for arch, s_in, s_out, varlen, vb in itertools.product(archs, STATE_DTYPES, STATE_DTYPES, (False, True), V_BLOCKS):
        yield KernelSpec(state_in=s_in, state_out=s_out, varlen=varlen, v_block=vb, arch=arch)
