"""Kernel specialisations: one object names one binary and renders its source.

Two kernel families share the parameter block (templates/kda_params.cuh):

* ``KernelSpec``, the chunked kernel (templates/kda_fwd.cuh): prefill and chunked prefill;
* ``DecodeSpec``, the token-by-token kernel (templates/kda_decode.cuh): decode and speculative
  verify, i.e. short sequences and per-token states.

Everything fixed at compile time lives here (state dtypes, varlen, gate kind, head dims, V-slice
width, target arch); everything else (pools, strides, checkpoints) is a run-time kernel argument.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from importlib import resources
from typing import ClassVar, Iterator, Union

from .arch import DEFAULT_TARGETS, check_target

STATE_DTYPES = ("none", "bf16", "fp32")
_STATE_CODE = {"none": 0, "bf16": 1, "fp32": 2}  # kStateNone / kStateBF16 / kStateFP32
# Gate kinds: the C++ type of each (templates/kda_gate.cuh), the one place a new kind is named.
#   bounded:      lower_bound in [FACTORISED_LOWER_BOUND, 0]; the chunked kernel factorises e^{+-G};
#   bounded_wide: any finite lower_bound below that; the anchored chunk form (docs/algorithm.md);
#   softplus:     lower_bound=None, Kimi Linear's gate; the anchored chunk form.
GATES = {"bounded": "flash_kda::BoundedGate", "bounded_wide": "flash_kda::WideBoundedGate",
         "softplus": "flash_kda::SoftplusGate"}
FACTORISED_LOWER_BOUND = -5.0  # 16 tokens decay by at most 80 nats: e^{+-G} stays a normal fp32
# The decode kernel has no chunk form: its "bounded" build serves every lower_bound.
DECODE_GATES = ("bounded", "softplus")
V_BLOCKS = (32, 64, 128)
# The anchored form's producer warps need more registers than a 128-wide CTA (384 threads, 168
# registers a thread) leaves them, so those gates run 32- and 64-wide slices.
ANCHORED_V_BLOCKS = (32, 64)
HEAD_DIM = 128
PRODUCER_WARPS = 4  # per CTA (templates/kda_fwd.cuh, Config<VB>)
# The token-by-token kernel's builds (templates/kda_decode.cuh, kOneGroup / kStreamed / kTokenOuter), with the
# CTAs an SM each is built for (its launch bounds, measured: DecodeConfig::kCtasPerSm).
DECODE_BUILDS = {"one_group": 7, "streamed": 5, "token_outer": 6}
DECODE_THREADS = 128
DECODE_ROWS_PER_GROUP = 4  # templates/kda_decode.cuh, DecodeConfig::kRows
KERNEL_NAME = "flash_kda_fwd_kernel"  # the entry symbol of every module


def gate_kind(lower_bound: float | None) -> str:
    """The chunked kernel's gate kind for a (checked) lower_bound; None is the softplus gate."""
    if lower_bound is None:
        return "softplus"
    return "bounded" if lower_bound >= FACTORISED_LOWER_BOUND else "bounded_wide"


def v_blocks_for(gate: str) -> tuple[int, ...]:
    """The chunked kernel's V-slice widths for a gate kind."""
    return V_BLOCKS if gate == "bounded" else ANCHORED_V_BLOCKS


def _cpp_bool(value: bool) -> str:
    return "true" if value else "false"


@dataclass(frozen=True)
class _SpecBase:
    state_in: str
    state_out: str
    varlen: bool
    gate: str = "bounded"
    head_k: int = HEAD_DIM
    head_v: int = HEAD_DIM
    arch: str = DEFAULT_TARGETS[0]  # the arch table (arch.py) names the targets

    kind: ClassVar[str] = ""
    template: ClassVar[str] = ""
    min_blocks_per_sm: ClassVar[int] = 1  # __launch_bounds__: how many CTAs must fit on an SM at once

    def __post_init__(self) -> None:
        if self.state_in not in STATE_DTYPES or self.state_out not in STATE_DTYPES:
            raise ValueError(f"state dtypes must be in {STATE_DTYPES}, got {self.state_in!r}/{self.state_out!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {tuple(GATES)}, got {self.gate!r}")
        if (self.head_k, self.head_v) != (HEAD_DIM, HEAD_DIM):
            raise ValueError(f"only K = V = {HEAD_DIM} is implemented, got K={self.head_k} V={self.head_v}")
        check_target(self.arch)

    def to_dict(self) -> dict:
        """What the cache's metadata records (and ``spec_from_dict`` reads back)."""
        return {"kind": self.kind, **asdict(self)}

    def identity_tag(self) -> bytes:
        """Bytes every cubin of this spec carries (``source`` embeds them), so the cache can tell a
        cubin that belongs to another specialisation even when its metadata was made to match."""
        return f"flash_kda_spec:{self.name}".encode()

    @property
    def name(self) -> str:
        raise NotImplementedError

    def _suffix(self) -> str:
        kind = "varlen" if self.varlen else "fixed"
        return f"in-{self.state_in}_out-{self.state_out}_{kind}_{self.arch}"

    def _entry(self, threads: int, launch_attrs: str, call: str, smem: str, checks: str) -> str:
        """The translation unit: the template, compile-time checks, the kernel entry and the globals
        the loader reads (dynamic shared memory size, identity)."""
        from .params import CHECKPOINT_SIZE, EXT_OFFSET, PARAMS_SIZE, POOL_SIZE
        return (
            f'#include "{self.template}"\n'
            f"// {self.name}\n"
            # sizes pin the layout (ext is the last member; NVRTC 13.0 has no offsetof)
            f"static_assert(sizeof(flash_kda::KdaParams) == {PARAMS_SIZE} && "
            f"sizeof(flash_kda::KdaExtras) == {PARAMS_SIZE - EXT_OFFSET} && "
            f"sizeof(flash_kda::PoolArgs) == {POOL_SIZE} && sizeof(flash_kda::CheckpointArgs) == {CHECKPOINT_SIZE}, "
            f'"flash_kda/jit/params.py and kda_params.cuh disagree on the parameter layout");\n'
            f"{checks}"
            f'extern "C" __global__ void __launch_bounds__({threads}, {self.min_blocks_per_sm}) {launch_attrs}\n'
            f"{KERNEL_NAME}(const flash_kda::KdaParams p) {{\n"
            f"  {call};\n"
            f"}}\n"
            f'extern "C" __device__ unsigned int flash_kda_smem_bytes = {smem};\n'
            f'extern "C" __device__ const char flash_kda_spec[] = "{self.identity_tag().decode()}";\n'
        )


@dataclass(frozen=True)
class KernelSpec(_SpecBase):
    """One compiled variant of the chunked KDA forward kernel."""

    v_block: int = 64

    kind: ClassVar[str] = "chunk"
    template: ClassVar[str] = "kda_fwd.cuh"

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.v_block) is not int or self.v_block not in v_blocks_for(self.gate):
            raise ValueError(f"v_block must be one of {v_blocks_for(self.gate)} (an int) for the {self.gate} gate, "
                             f"got {self.v_block!r}")

    @property
    def name(self) -> str:
        return f"kda_fwd_{self.gate}_k{self.head_k}v{self.head_v}_vb{self.v_block}_{self._suffix()}"

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
        args = (f"{self.v_block}, {_STATE_CODE[self.state_in]}, {_STATE_CODE[self.state_out]}, {_cpp_bool(self.varlen)}, "
                f"{GATES[self.gate]}")
        return self._entry(
            self.threads, f"__cluster_dims__({self.cluster}, 1, 1) " if self.cluster > 1 else "",
            f"flash_kda::kda_fwd<{args}>(p)", f"sizeof(flash_kda::SharedStorage<{self.v_block}>)",
            f"static_assert(flash_kda::Config<{self.v_block}>::kThreads == {self.threads} && "
            f"flash_kda::Config<{self.v_block}>::kCluster == {self.cluster}, "
            f'"spec.py and the template disagree on the launch shape");\n')


@dataclass(frozen=True)
class DecodeSpec(_SpecBase):
    """One compiled variant of the token-by-token kernel (decode, speculative verify).

    ``build`` (DECODE_BUILDS; the host picks one: api._decode_ctas_per_head): ``one_group`` runs 8
    CTAs per head, one group of 4 value rows per warp in registers; ``streamed`` (one-token steps) and
    ``token_outer`` (multi-token steps) run 2 or 4, their warps holding several groups in shared
    memory."""

    build: str = "one_group"

    kind: ClassVar[str] = "decode"
    template: ClassVar[str] = "kda_decode.cuh"
    threads: ClassVar[int] = DECODE_THREADS
    cluster: ClassVar[int] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.build not in DECODE_BUILDS:
            raise ValueError(f"the decode kernel's build must be one of {tuple(DECODE_BUILDS)}, got {self.build!r}")
        if self.gate not in DECODE_GATES:
            raise ValueError(f"the decode kernel's gate must be one of {DECODE_GATES} (its bounded build serves every "
                             f"lower_bound), got {self.gate!r}")

    @property
    def min_blocks_per_sm(self) -> int:  # type: ignore[override]
        """CTAs per SM the launch bounds ask for (registers: see DecodeConfig in kda_decode.cuh)."""
        return DECODE_BUILDS[self.build]

    @property
    def name(self) -> str:
        build = "decode" if self.build == "one_group" else f"decode_{self.build}"
        return f"kda_{build}_{self.gate}_k{self.head_k}v{self.head_v}_{self._suffix()}"

    @property
    def splits(self) -> int:
        """CTAs per (sequence, head) of the one-group build: one group of 4 value rows per warp. The
        other builds are launched with 2 or 4 (each warp then holds 4 or 2 groups)."""
        return self.head_v // (DECODE_ROWS_PER_GROUP * DECODE_THREADS // 32)

    def source(self) -> str:
        build = list(DECODE_BUILDS).index(self.build)
        args = (f"{_STATE_CODE[self.state_in]}, {_STATE_CODE[self.state_out]}, {_cpp_bool(self.varlen)}, {build}, "
                f"{GATES[self.gate]}")
        return self._entry(
            self.threads, "", f"flash_kda::kda_decode<{args}>(p)", "0",
            f"static_assert(flash_kda::DecodeConfig::kThreads == {self.threads} && "
            f"flash_kda::DecodeConfig::kMaxCtasPerHead == {self.splits} && "
            f"flash_kda::DecodeConfig::kCtasPerSm<{build}> == {self.min_blocks_per_sm}, "
            f'"spec.py and the template disagree on the launch shape");\n')


AnySpec = Union[KernelSpec, DecodeSpec]
SPEC_KINDS = {cls.kind: cls for cls in (KernelSpec, DecodeSpec)}


def spec_from_dict(data: dict) -> AnySpec:
    """The spec a cache entry's metadata describes (``to_dict``)."""
    data = dict(data)
    cls = SPEC_KINDS[data.pop("kind", "chunk")]
    return cls(**data)


def template_sources() -> dict[str, str]:
    """Every template file shipped in the package, by include name."""
    root = resources.files("flash_kda") / "templates"
    return {entry.name: entry.read_text() for entry in sorted(root.iterdir(), key=lambda e: e.name)
            if entry.name.endswith((".cuh", ".h"))}


def all_specs(archs: tuple[str, ...] = DEFAULT_TARGETS) -> Iterator[AnySpec]:
    """Every specialisation the library may launch, for the given archs."""
    for arch, s_in, s_out, varlen in itertools.product(archs, STATE_DTYPES, STATE_DTYPES, (False, True)):
        for gate in GATES:
            for vb in v_blocks_for(gate):
                yield KernelSpec(state_in=s_in, state_out=s_out, varlen=varlen, v_block=vb, arch=arch, gate=gate)
        for gate, build in itertools.product(DECODE_GATES, DECODE_BUILDS):
            yield DecodeSpec(state_in=s_in, state_out=s_out, varlen=varlen, arch=arch, build=build, gate=gate)
