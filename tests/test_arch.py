"""The arch table and what hangs off it, on the CPU machine: which specialisations each target gets,
the variant switch (FLASH_KDA_KERNEL), the portable variant's PTX (nothing sm_90-only in it), and the
precompiled headers that make compiling for every target affordable."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from flash_kda import api
from flash_kda.jit.arch import ALL_TARGETS, ARCHS, REFERENCE_TARGET, arch_for_capability, check_target
from flash_kda.jit.compiler import PCH_PREFIX, PCH_STALE_SECONDS, NVRTCCompiler, remove_stale_pch_dirs
from flash_kda.jit.spec import (V_BLOCKS, DecodeSpec, EarlierSpecLayout, KernelSpec, all_specs, spec_from_dict,
                                spec_state_dtypes, v_blocks_for)
from flash_kda.precompile import resolve_targets

# Instructions that exist from sm_90 on; the portable variant's compute_80 PTX must have none of them.
SM90_ONLY = ("cluster", "mapa", "try_wait", "expect_tx", "st.async", "cp.async.bulk", "fence.proxy.async")


def test_each_capability_has_one_target_and_the_table_is_consistent():
    capabilities = [a.capability for a in ARCHS.values()]
    assert len(set(capabilities)) == len(capabilities)
    for target, arch in ARCHS.items():
        assert arch_for_capability(*arch.capability) is arch and check_target(target) is arch
        assert arch.producer_warps in (2, 4)
        # the clustered slot ring (8 slots) needs the big shared memory
        assert not arch.clusters or arch.max_smem_per_block >= 200 * 1024
    assert arch_for_capability(7, 5) is None and REFERENCE_TARGET in ARCHS


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_each_target_gets_its_variants_once(target):
    specs = list(all_specs((target,)))
    assert len(set(specs)) == len(specs) and {s.arch for s in specs} == {target}
    chunked = [s for s in specs if isinstance(s, KernelSpec)]
    decode = [s for s in specs if isinstance(s, DecodeSpec)]
    clusters = {s.cluster for s in chunked}
    assert clusters == ({1, 2} if ARCHS[target].clusters else {1})
    # per state dtype pair: bounded 32/64/128, the general gates 32/64 each, and 128 each where registers
    # can be reallocated; clustered: + 2 + 2 + 2 (the 32- and 64-wide slices of every gate)
    per_pair = 7 + (2 if ARCHS[target].register_reallocation else 0) + (6 if ARCHS[target].clusters else 0)
    # 4 state dtype pairs (bf16 / fp32 each side); the decode kernel: x 2 gates x 3 builds x 2 layouts
    assert len(chunked) == 4 * per_pair and len(decode) == 48
    assert all(s.cluster == 1 for s in chunked if s.v_block == 128)
    assert all(s.threads == (s.v_block // 16 + ARCHS[target].producer_warps) * 32 for s in chunked)


def test_spec_cluster_defaults_to_the_most_the_arch_allows():
    assert KernelSpec("fp32", "fp32", v_block=64).cluster == 2
    assert KernelSpec("fp32", "fp32", v_block=64, cluster=1).name.count("_vb64_c1_") == 1
    assert KernelSpec("fp32", "fp32", v_block=128).cluster == 1
    assert KernelSpec("fp32", "fp32", v_block=32, arch="sm_80").cluster == 1
    with pytest.raises(ValueError, match="cluster must be 1 for v_block=64 on sm_86"):
        KernelSpec("fp32", "fp32", v_block=64, arch="sm_86", cluster=2)
    with pytest.raises(ValueError, match="cluster must be 1 for v_block=128"):
        KernelSpec("fp32", "fp32", v_block=128, cluster=2)


def test_general_gates_run_128_wide_only_where_registers_can_be_reallocated():
    """The general gates' 128-wide CTA moves registers from its consumers to its producers (setmaxnreg,
    kda_fwd.cuh); elsewhere the spec refuses that width and a launch gets the 64-wide kernel."""
    for target, arch in ARCHS.items():
        assert v_blocks_for("bounded", target) == (32, 64, 128)
        assert v_blocks_for("softplus", target) == v_blocks_for("bounded_wide", target) == (
            (32, 64, 128) if arch.register_reallocation else (32, 64))
        assert api._spec("fp32", "fp32", False, 128, "softplus", target).v_block == (
            128 if arch.register_reallocation else 64)
        assert api._spec("fp32", "fp32", False, 128, "bounded", target).v_block == 128
    assert {t for t, a in ARCHS.items() if a.register_reallocation} == {"sm_90a", "sm_100a", "sm_103a"}
    with pytest.raises(ValueError, match=r"v_block must be one of \(32, 64\) \(an int\) for the softplus gate on sm_80"):
        KernelSpec("fp32", "fp32", v_block=128, gate="softplus", arch="sm_80")


@pytest.mark.parametrize("target", ["sm_90a", "sm_100a"])
def test_the_128_wide_general_kernel_keeps_its_launch_registers(target):
    """setmaxnreg moves registers inside what the CTA was launched with: the counts in kda_fwd.cuh assume
    168 a thread (384 threads), so ptxas must report exactly that, with no spill in either warpgroup; an
    increase beyond the CTA's registers would never return."""
    spec = KernelSpec("fp32", "fp32", v_block=128, gate="softplus", arch=target)
    _, report = NVRTCCompiler()._compile(spec, ptx=False, verbose=True)
    assert re.findall(r"Used (\d+) registers", report) == ["168"], report
    assert set(re.findall(r"(\d+) bytes spill (?:stores|loads)", report)) == {"0"}, report


def test_a_kernel_that_moves_registers_must_load_with_its_launch_share():
    """KernelSpec.launch_registers names the kernels whose warpgroups move registers (the general gates at
    128 wide); the loader refuses one whose cubin has another count, which could hang at setmaxnreg."""
    from flash_kda.jit.runtime import check_launch_registers
    for gate in ("softplus", "bounded_wide"):
        spec = KernelSpec("fp32", "fp32", v_block=128, gate=gate)
        assert spec.launch_registers == 168
        check_launch_registers(spec, 168)
        with pytest.raises(RuntimeError, match=rf"{spec.name} was compiled to 160 registers a thread.*assumption "
                                               r"of 168; launching it could hang"):
            check_launch_registers(spec, 160)
    for spec in (KernelSpec("fp32", "fp32", v_block=128, gate="bounded"),
                 KernelSpec("fp32", "fp32", v_block=64, gate="softplus")):
        assert spec.launch_registers is None
        check_launch_registers(spec, 99)


def test_the_32_wide_softplus_kernel_runs_the_clamped_gate():
    """spec.CHUNK_GATE_TYPES: the 32-wide chunked kernel's softplus gate is ClampedSoftplusGate (kda_gate.cuh);
    every other width, and the decode kernel, run SoftplusGate."""
    for vb in V_BLOCKS:
        source = KernelSpec("fp32", "fp32", v_block=vb, gate="softplus").source()
        assert ("flash_kda::ClampedSoftplusGate" in source) is (vb == 32)
    assert "flash_kda::SoftplusGate>" in DecodeSpec("fp32", "fp32", build="streamed", gate="softplus").source()


def test_producer_remat_follows_the_arch_table():
    """PRODUCER_REMAT (kda_chunk_layout.cuh) where the table asks for it: the Blackwell targets. It is a
    template argument only when on, so the other targets' sources (and cache keys) are as before."""
    for target, arch in ARCHS.items():
        spec = KernelSpec("fp32", "fp32", v_block=64, gate="softplus", arch=target)
        assert spec.producer_remat is arch.producer_remat
        assert ("_remat_" in spec.name) is arch.producer_remat
        assert (f"Config<64, {spec.cluster}, {arch.producer_warps}, true>" in spec.source()) is arch.producer_remat
    assert {t for t, a in ARCHS.items() if a.producer_remat} == {"sm_100a", "sm_103a", "sm_120a", "sm_121a"}
    twin = KernelSpec("fp32", "fp32", v_block=64, producer_remat=True)  # what tests/test_gpu_remat.py runs
    assert twin.arch == "sm_90a" and "Config<64, 2, 4, true>" in twin.source() and twin != KernelSpec("fp32", "fp32")
    with pytest.raises(ValueError, match="producer_remat must be a bool or None"):
        KernelSpec("fp32", "fp32", producer_remat=1)


def test_cache_metadata_round_trips_and_earlier_entries_read_back_as_built():
    """spec_from_dict (what verify reads from an entry's metadata): this version's dicts give the spec back;
    a chunked entry written before producer_remat existed was built without it, so it reads back as such
    (its name is the entry's directory, and verify counts it as another version's entry); one with the
    earlier layout field is named as such."""
    for target in ALL_TARGETS:
        spec = KernelSpec("bf16", "fp32", v_block=32, gate="bounded_wide", arch=target)
        assert spec_from_dict(spec.to_dict()) == spec
    earlier = {k: v for k, v in KernelSpec("fp32", "fp32", arch="sm_100a").to_dict().items() if k != "producer_remat"}
    old = spec_from_dict(earlier)
    assert old.producer_remat is False and "_remat_" not in old.name
    with pytest.raises(EarlierSpecLayout, match="spec fields \\['varlen'\\]"):
        spec_from_dict({**earlier, "varlen": True})


def test_an_earlier_decode_entry_reads_as_another_versions():
    """A decode entry written by an earlier flash_kda (its spec had a grouped field, since split into builds)
    is another version's entry, as a chunked one with varlen is: verify counts it, never as unreadable."""
    earlier = {**DecodeSpec("fp32", "fp32", varlen=True).to_dict(), "grouped": True}
    earlier.pop("build")
    with pytest.raises(EarlierSpecLayout, match="spec fields \\['grouped'\\]"):
        spec_from_dict(earlier)
    spec = DecodeSpec("bf16", "fp32", build="token_outer", gate="softplus", arch="sm_120a")
    assert spec_from_dict(spec.to_dict()) == spec


def test_an_entry_with_values_this_version_does_not_take_reads_as_another_versions():
    """An earlier flash_kda wrote decode specs with a "none" state dtype (this one maps a missing state to the
    other's dtype: spec_state_dtypes); found in a real ~/.cache, verify reported them as unreadable."""
    earlier = {**DecodeSpec("fp32", "fp32", build="token_outer").to_dict(), "state_out": "none"}
    with pytest.raises(EarlierSpecLayout, match="written by another flash_kda version \\(state dtypes must be"):
        spec_from_dict(earlier)


@pytest.mark.parametrize("call,kernel", [
    (("none", "none"), ("fp32", "fp32")), (("none", "bf16"), ("bf16", "bf16")), (("bf16", "none"), ("bf16", "bf16")),
    (("fp32", "bf16"), ("fp32", "bf16")), (("none", "fp32"), ("fp32", "fp32")),
])
def test_a_missing_state_runs_the_kernel_of_the_other(call, kernel):
    assert spec_state_dtypes(*call) == kernel
    assert api._spec(*call, False, 32, "bounded", "sm_90a").state_in == kernel[0]
    with pytest.raises(ValueError, match="state dtypes must be in"):
        KernelSpec("none", "fp32")


def test_all_and_repeated_archs_resolve_in_table_order():
    assert resolve_targets("all") == ALL_TARGETS
    assert resolve_targets(["sm_86", "sm_90a", "sm_86"]) == ("sm_86", "sm_90a")
    with pytest.raises(ValueError, match="did you mean sm_100a"):
        resolve_targets(["sm_100"])
    if not torch.cuda.is_available():  # no GPU visible: the reference target
        assert resolve_targets(None) == (REFERENCE_TARGET,)


@pytest.mark.parametrize("setting,arch,expected", [
    ("", "sm_90a", "clustered"), ("", "sm_86", "portable"), ("portable", "sm_90a", "portable"),
    ("Clustered ", "sm_100a", "clustered"), ("portable", "sm_80", "portable"),
])
def test_the_variant_switch(monkeypatch, setting, arch, expected):
    monkeypatch.setenv("FLASH_KDA_KERNEL", setting)
    api.reset_variant()
    try:
        assert api.chunk_variant(arch) == expected
        spec = api._spec("fp32", "fp32", False, 64, "bounded", arch)
        assert spec.cluster == (2 if expected == "clustered" else 1)
    finally:
        api.reset_variant()


@pytest.mark.parametrize("setting,exc,message", [
    ("clustered", RuntimeError, "FLASH_KDA_KERNEL=clustered, but sm_86 runs only the portable variant"),
    ("fast", ValueError, "FLASH_KDA_KERNEL must be one of clustered, portable"),
])
def test_a_variant_the_arch_cannot_run_is_refused(monkeypatch, setting, exc, message):
    monkeypatch.setenv("FLASH_KDA_KERNEL", setting)
    api.reset_variant()
    try:
        with pytest.raises(exc, match=message):
            api.chunk_variant("sm_86")
    finally:
        api.reset_variant()


def test_device_arch_follows_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 9))
    assert api.device_arch.__wrapped__(0) == "sm_89"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla V100")
    with pytest.raises(RuntimeError, match=r"Tesla V100\) has compute capability 7.0.*sm_80 \(A100"):
        api.device_arch.__wrapped__(0)


@pytest.mark.parametrize("spec", [
    KernelSpec("fp32", "fp32", v_block=64, arch="sm_80"),
    KernelSpec("bf16", "bf16", v_block=32, gate="softplus", arch="sm_80"),
    KernelSpec("bf16", "fp32", v_block=128, gate="bounded", arch="sm_80"),
    DecodeSpec("fp32", "bf16", build="token_outer", arch="sm_80", varlen=True),
], ids=lambda s: s.name)
def test_portable_ptx_has_nothing_sm90_only(spec):
    """The compute_80 PTX of the portable variant (the GPU suite also runs it through the driver's JIT
    on the H100: test_gpu_portable.py)."""
    ptx = NVRTCCompiler()._compile(spec, ptx=True, verbose=False)[0].decode(errors="replace")
    assert re.search(r"^\.target sm_80\b", ptx, re.M), ptx[:400]
    leaked = [word for word in SM90_ONLY if word in ptx]
    assert not leaked, f"{spec.name}: sm_90-only instructions in the portable PTX: {leaked}"


def test_the_clustered_ptx_does_use_them():  # the check above can see what it looks for
    ptx = NVRTCCompiler()._compile(KernelSpec("fp32", "fp32", v_block=64), ptx=True, verbose=False)[0]
    assert all(word.encode() in ptx for word in ("mapa", "try_wait", "cp.async.bulk", "st.async", "expect_tx"))


def test_precompiled_headers_do_not_change_the_cubin(monkeypatch):
    spec = DecodeSpec("bf16", "bf16", build="streamed", arch="sm_89")
    digests = []
    for setting in ("0", "1", "1"):  # without; building the PCH; using it
        monkeypatch.setenv("FLASH_KDA_JIT_PCH", setting)
        digests.append(hashlib.sha256(NVRTCCompiler()._compile(spec, ptx=False, verbose=False)[0]).hexdigest())
    assert len(set(digests)) == 1


def test_pch_directories_of_killed_processes_are_removed(tmp_path):
    """A precompile worker killed by SIGKILL runs no atexit: the next process to build a PCH removes its
    directory once it is PCH_STALE_SECONDS old, and keeps a running process's, a recent one and others."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale, recent = tmp_path / f"{PCH_PREFIX}{dead_pid}_a", tmp_path / f"{PCH_PREFIX}{dead_pid}_b"
    running, unrelated = tmp_path / f"{PCH_PREFIX}{os.getpid()}_c", tmp_path / f"{PCH_PREFIX}other"
    not_a_pid = tmp_path / f"{PCH_PREFIX}{10 ** 30}_d"
    for directory in (stale, recent, running, unrelated, not_a_pid):
        (directory / "0123abcd").mkdir(parents=True)
    old = time.time() - 2 * PCH_STALE_SECONDS
    for directory in (stale, running, unrelated, not_a_pid):
        os.utime(directory, (old, old))
    assert remove_stale_pch_dirs(str(tmp_path)) == 1
    assert not stale.exists() and recent.exists() and running.exists() and unrelated.exists() and not_a_pid.exists()
