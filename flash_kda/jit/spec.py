"""Kernel specialisations: one object names one binary and renders its source.

Two kernel families share the parameter block (templates/kda_params.cuh):

* ``KernelSpec``, the chunked kernel (templates/kda_fwd.cuh): prefill and chunked prefill;
* ``DecodeSpec``, the token-by-token kernel (templates/kda_decode.cuh): decode and speculative
  verify, i.e. short sequences and per-token states.

Everything fixed at compile time lives here (state dtypes, gate kind, head dims, V-slice width,
cluster size, target arch; the layout, fixed or varlen, for the decode kernel only); everything else
(the chunked kernel's layout; whether there is a state; pools, strides, checkpoints) is a run-time
kernel argument.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass
from importlib import resources
from typing import ClassVar, Iterator, Union

from .arch import ALL_TARGETS, REFERENCE_TARGET, check_target

STATE_DTYPES = ("none", "bf16", "fp32")  # what a call may pass for each state (none: no tensor)
# The kernels are specialised on the dtype of the states only: whether a state is read or written is a
# run-time fact (a null pointer, or has_initial_state, or an invalid slot), so a call without one runs
# the kernel of the other state's dtype (spec_state_dtypes): 4 dtype pairs to compile, not 9.
SPEC_STATE_DTYPES = ("bf16", "fp32")
_STATE_CODE = {"bf16": 1, "fp32": 2}  # kStateBF16 / kStateFP32 (templates/kda_params.cuh)
# Gate kinds: the C++ type of each (templates/kda_gate.cuh), the one place a new kind is named.
#   bounded:      lower_bound in [FACTORISED_LOWER_BOUND, 0]; the chunked kernel factorises e^{+-G};
#   bounded_wide: any finite lower_bound below that; the anchored chunk form (docs/algorithm.md);
#   softplus:     lower_bound=None, Kimi Linear's gate; the anchored chunk form.
GATES = {"bounded": "flash_kda::BoundedGate", "bounded_wide": "flash_kda::WideBoundedGate",
         "softplus": "flash_kda::SoftplusGate"}
# Where the chunked kernel of one width runs another C++ type for a gate kind (the same math): tuned per
# width on the H100 (templates/kda_gate.cuh, ClampedSoftplusGate).
CHUNK_GATE_TYPES = {("softplus", 32): "flash_kda::ClampedSoftplusGate"}
# Whether the gate kind's C++ type has kFactorised (every chunk factorises; templates/kda_gate.cuh).
GATE_FACTORISES = {"bounded": True, "bounded_wide": False, "softplus": False}
FACTORISED_LOWER_BOUND = -5.0  # 16 tokens decay by at most 80 nats: e^{+-G} stays a normal fp32
# The decode kernel has no chunk form: its "bounded" build serves every lower_bound.
DECODE_GATES = ("bounded", "softplus")
V_BLOCKS = (32, 64, 128)
# The general gates' producer warps need more registers than a 128-wide CTA (384 threads, 168 registers
# a thread) leaves them evenly: they run 128-wide slices only where the consumers can give registers up
# (Arch.register_reallocation), 32- and 64-wide everywhere.
ANCHORED_V_BLOCKS = (32, 64)
HEAD_DIM = 128
# The token-by-token kernel's builds (templates/kda_decode.cuh, kOneGroup / kStreamed / kTokenOuter), with the
# CTAs an SM each is built for (its launch bounds), measured on the H100 (benchmarks/NOTES.md, "Serving path,
# round 5"): the one-group build fits in 72 registers (7 CTAs an SM); the streamed build runs one-token steps
# best at 5 (96 registers; Arch.streamed_decode_ctas_per_sm may lower it); the token-outer build (a 32 KB fp32
# ring and a 3.3 KB stage a CTA) fits in 80, and verify runs best with all 6 resident.
DECODE_BUILDS = {"one_group": 7, "streamed": 5, "token_outer": 6}
DECODE_THREADS = 128
DECODE_ROWS_PER_GROUP = 4  # templates/kda_decode.cuh, DecodeConfig::kRows
KERNEL_NAME = "flash_kda_fwd_kernel"  # the entry symbol of every module


def spec_state_dtypes(state_in: str, state_out: str) -> tuple[str, str]:
    """The (initial, final) state dtypes of the kernel that serves a call's: a missing state takes the
    other's dtype, and fp32 when both are missing."""
    if state_in == "none":
        state_in = state_out if state_out != "none" else "fp32"
    return state_in, state_in if state_out == "none" else state_out


def gate_kind(lower_bound: float | None) -> str:
    """The chunked kernel's gate kind for a (checked) lower_bound; None is the softplus gate."""
    if lower_bound is None:
        return "softplus"
    return "bounded" if lower_bound >= FACTORISED_LOWER_BOUND else "bounded_wide"


def v_blocks_for(gate: str, arch: str) -> tuple[int, ...]:
    """The chunked kernel's V-slice widths for a gate kind on an arch."""
    if GATE_FACTORISES[gate] or check_target(arch).register_reallocation:
        return V_BLOCKS
    return ANCHORED_V_BLOCKS


@dataclass(frozen=True)
class _SpecBase:
    state_in: str
    state_out: str
    gate: str = "bounded"
    head_k: int = HEAD_DIM
    head_v: int = HEAD_DIM
    arch: str = REFERENCE_TARGET  # the arch table (arch.py) names the targets

    kind: ClassVar[str] = ""
    template: ClassVar[str] = ""
    min_blocks_per_sm: ClassVar[int] = 1  # __launch_bounds__: how many CTAs must fit on an SM at once

    def __post_init__(self) -> None:
        if self.state_in not in SPEC_STATE_DTYPES or self.state_out not in SPEC_STATE_DTYPES:
            raise ValueError(f"state dtypes must be in {SPEC_STATE_DTYPES} (a call without a state runs the kernel "
                             f"of spec_state_dtypes), got {self.state_in!r}/{self.state_out!r}")
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
        return f"in-{self.state_in}_out-{self.state_out}_{self.arch}"

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
    """One compiled variant of the chunked KDA forward kernel.

    ``cluster``: CTAs per thread-block cluster. None (the default) means the most the arch allows:
    2 for the 32- and 64-wide slices where the arch runs the clustered variant (the pair shares each
    chunk's preparation through distributed shared memory), else 1. 1 is the portable variant
    (FLASH_KDA_KERNEL=portable); the 128-wide slice is one CTA per head in both.

    ``producer_remat``: the producer warps recompute their lane-, warp- and slot-derived addresses
    every chunk (kda_chunk_layout.cuh, PRODUCER_REMAT). None (the default) means the arch's choice
    (``Arch.producer_remat``: on Blackwell, whose ptxas spills them otherwise); tests/test_gpu_remat.py
    runs the sm_90a build with it on, where the hardware to run Blackwell's is missing."""

    v_block: int = 64
    cluster: int | None = None
    producer_remat: bool | None = None

    kind: ClassVar[str] = "chunk"
    template: ClassVar[str] = "kda_fwd.cuh"

    def __post_init__(self) -> None:
        super().__post_init__()
        widths = v_blocks_for(self.gate, self.arch)
        if type(self.v_block) is not int or self.v_block not in widths:
            raise ValueError(f"v_block must be one of {widths} (an int) for the {self.gate} gate on {self.arch}, "
                             f"got {self.v_block!r}")
        most = 2 if check_target(self.arch).clusters and self.splits >= 2 else 1
        if self.producer_remat is None:
            object.__setattr__(self, "producer_remat", check_target(self.arch).producer_remat)
        elif type(self.producer_remat) is not bool:
            raise ValueError(f"producer_remat must be a bool or None, got {self.producer_remat!r}")
        if self.cluster is None:
            object.__setattr__(self, "cluster", most)
        elif type(self.cluster) is not int or not 1 <= self.cluster <= most:
            raise ValueError(f"cluster must be 1{' or 2' if most == 2 else ''} for v_block={self.v_block} on "
                             f"{self.arch}, got {self.cluster!r}")

    @property
    def name(self) -> str:
        return (f"kda_fwd_{self.gate}_k{self.head_k}v{self.head_v}_vb{self.v_block}_c{self.cluster}_"
                f"{'remat_' if self.producer_remat else ''}{self._suffix()}")

    @property
    def producer_warps(self) -> int:
        return check_target(self.arch).producer_warps

    @property
    def threads(self) -> int:
        return (self.v_block // 16 + self.producer_warps) * 32

    @property
    def launch_registers(self) -> int | None:
        """Registers a thread this kernel must be launched with, where its warpgroups move registers among
        themselves (the general gates at 128 wide: kda_fwd.cuh's kReallocate, whose counts add up to exactly
        this); None for the other kernels. The loader checks it (runtime.check_launch_registers)."""
        if self.v_block != 128 or GATE_FACTORISES[self.gate]:
            return None
        return 65536 // self.threads // 8 * 8

    @property
    def splits(self) -> int:
        """CTAs per (sequence, head): the value axis is cut into this many slices."""
        return self.head_v // self.v_block

    def source(self) -> str:
        remat = ", true" if self.producer_remat else ""
        config = f"flash_kda::Config<{self.v_block}, {self.cluster}, {self.producer_warps}{remat}>"
        gate_type = CHUNK_GATE_TYPES.get((self.gate, self.v_block), GATES[self.gate])
        args = f"{config}, {_STATE_CODE[self.state_in]}, {_STATE_CODE[self.state_out]}, {gate_type}"
        max_smem = check_target(self.arch).max_smem_per_block
        return self._entry(
            self.threads, f"__cluster_dims__({self.cluster}, 1, 1) " if self.cluster > 1 else "",
            f"flash_kda::kda_fwd<{args}>(p)", f"sizeof(flash_kda::SharedStorage<{config}>)",
            f"static_assert({config}::kThreads == {self.threads}, "
            f'"spec.py and the template disagree on the launch shape");\n'
            f"static_assert(sizeof(flash_kda::SharedStorage<{config}>) <= {max_smem}, "
            f'"the slot ring does not fit {self.arch}\'s shared memory (jit/arch.py)");\n')


@dataclass(frozen=True)
class DecodeSpec(_SpecBase):
    """One compiled variant of the token-by-token kernel (decode, speculative verify).

    ``build`` (DECODE_BUILDS; the host picks one: api._decode_ctas_per_head): ``one_group`` runs 8
    CTAs per head, one group of 4 value rows per warp in registers; ``streamed`` (one-token steps) and
    ``token_outer`` (multi-token steps) run 2 or 4, their warps holding several groups in shared
    memory."""

    build: str = "one_group"
    # fixed or varlen layout: a compile-time axis here only (the streamed build has no register to spare
    # for the other path; the chunked kernel reads it at run time)
    varlen: bool = False

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
        """CTAs per SM the launch bounds ask for (registers: DECODE_BUILDS and the arch table)."""
        if self.build == "streamed":
            return min(DECODE_BUILDS["streamed"], check_target(self.arch).streamed_decode_ctas_per_sm)
        return DECODE_BUILDS[self.build]

    @property
    def name(self) -> str:
        build = "decode" if self.build == "one_group" else f"decode_{self.build}"
        layout = "varlen" if self.varlen else "fixed"
        return f"kda_{build}_{self.gate}_k{self.head_k}v{self.head_v}_{layout}_{self._suffix()}"

    @property
    def splits(self) -> int:
        """CTAs per (sequence, head) of the one-group build: one group of 4 value rows per warp. The
        other builds are launched with 2 or 4 (each warp then holds 4 or 2 groups)."""
        return self.head_v // (DECODE_ROWS_PER_GROUP * DECODE_THREADS // 32)

    def source(self) -> str:
        build = list(DECODE_BUILDS).index(self.build)
        args = (f"{_STATE_CODE[self.state_in]}, {_STATE_CODE[self.state_out]}, {'true' if self.varlen else 'false'}, "
                f"{build}, {GATES[self.gate]}")
        return self._entry(
            self.threads, "", f"flash_kda::kda_decode<{args}>(p)", "0",
            f"static_assert(flash_kda::DecodeConfig::kThreads == {self.threads} && "
            f"flash_kda::DecodeConfig::kMaxCtasPerHead == {self.splits}, "
            f'"spec.py and the template disagree on the launch shape");\n')


AnySpec = Union[KernelSpec, DecodeSpec]
SPEC_KINDS = {cls.kind: cls for cls in (KernelSpec, DecodeSpec)}


class EarlierSpecLayout(ValueError):
    """Cache metadata written by another flash_kda version, whose specs had fields this one does not
    (an earlier chunked spec's varlen, an earlier decode spec's grouped) or values it does not take (an
    earlier decode spec's "none" state): its entries are never loaded (other names and keys), and verify
    counts them as other versions' entries."""


def spec_from_dict(data: dict) -> AnySpec:
    """The spec a cache entry's metadata describes (``to_dict``)."""
    data = dict(data)
    cls = SPEC_KINDS[data.pop("kind", "chunk")]
    unknown = data.keys() - {field.name for field in dataclasses.fields(cls)}
    if unknown:
        raise EarlierSpecLayout(f"written by another flash_kda version (spec fields {sorted(unknown)})")
    if cls is KernelSpec:
        # entries written before producer_remat existed were built without it, whatever the arch's choice now
        data.setdefault("producer_remat", False)
    try:
        return cls(**data)
    except (ValueError, TypeError) as exc:  # values this version never writes (an earlier spec's "none" state)
        raise EarlierSpecLayout(f"written by another flash_kda version ({exc})") from exc


# this package's own name, "flash_kda" or wherever an engine vendored it (e.g. "vllm.third_party.flash_kda"): the
# templates compiled and hashed are always this copy's, never another installed flash_kda's, and its custom op is
# its own (api.OP_NAMESPACE)
PACKAGE = __name__.rpartition(".jit.")[0]


def template_sources() -> dict[str, str]:
    """Every template file shipped in the package, by include name."""
    root = resources.files(PACKAGE) / "templates"
    return {entry.name: entry.read_text() for entry in sorted(root.iterdir(), key=lambda e: e.name)
            if entry.name.endswith((".cuh", ".h"))}


def all_specs(archs: tuple[str, ...] = ALL_TARGETS) -> Iterator[AnySpec]:
    """Every specialisation the library may launch, for the given archs: on an arch with clusters,
    the chunked kernel's clustered and portable variants."""
    for arch, s_in, s_out in itertools.product(archs, SPEC_STATE_DTYPES, SPEC_STATE_DTYPES):
        for gate in GATES:
            for vb in v_blocks_for(gate, arch):
                widest = KernelSpec(state_in=s_in, state_out=s_out, v_block=vb, arch=arch, gate=gate)
                yield widest
                if widest.cluster > 1:
                    yield dataclasses.replace(widest, cluster=1)
        for gate, build, varlen in itertools.product(DECODE_GATES, DECODE_BUILDS, (False, True)):
            yield DecodeSpec(state_in=s_in, state_out=s_out, arch=arch, build=build, gate=gate, varlen=varlen)
