"""The JIT for real on the CPU machine: NVRTC compiles every specialisation for every target of the
arch table (the session's ``baked_cache``, through precompile's worker processes, spill check on); the cache locks, publishes
atomically, detects damage; precompile and the CLI work without a GPU."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flash_kda.errors import CacheMissError, CompileError
from flash_kda.jit import KernelCache, KernelSpec, all_specs, build, get_compiler
from flash_kda.jit import cache as cache_mod
from flash_kda.jit.arch import ALL_TARGETS
from flash_kda.jit.compiler import NVRTCCompiler
from flash_kda.jit.spec import KERNEL_NAME, DecodeSpec

from cache_helpers import FakeCompiler as CountingCompiler
from cache_helpers import env as helper_env
from cache_helpers import python

ALL_SPECS = list(all_specs(ALL_TARGETS))
SMALL = KernelSpec(state_in="fp32", state_out="fp32", v_block=64)


def _is_cubin(data: bytes) -> bool:
    # ELF magic, and the kernel symbol is in the image
    return data[:4] == b"\x7fELF" and KERNEL_NAME.encode() in data


@pytest.mark.parametrize("spec", ALL_SPECS, ids=[s.name for s in ALL_SPECS])
def test_nvrtc_compiled_specialisation(spec, baked_cache):
    """Every specialisation was compiled by NVRTC (in ``baked_cache``) into a loadable-looking cubin
    that carries its own name, and is a hit now."""
    cubin, path, compiled = build(spec, cache=KernelCache(baked_cache), compiler=NVRTCCompiler(), allow_build=False)
    assert not compiled and _is_cubin(cubin) and spec.identity_tag() in cubin
    assert path.is_file() and path.with_suffix(".json").is_file()


def test_entry_publish_is_atomic_and_complete(tmp_path):
    cache = KernelCache(tmp_path)
    _, path, _ = build(SMALL, cache=cache, compiler=CountingCompiler())
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["size"] == path.stat().st_size and meta["spec"]["v_block"] == 64
    leftovers = [p.name for p in path.parent.iterdir() if p.suffix not in (".cubin", ".json", ".lock")]
    assert leftovers == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_meta"])
def test_damaged_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    cache, comp = KernelCache(tmp_path), CountingCompiler()
    _, path, _ = build(SMALL, cache=cache, compiler=comp)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        path.with_suffix(".json").unlink()
    with caplog.at_level(logging.WARNING, logger="flash_kda.jit"):
        rebuilt, _, compiled = build(SMALL, cache=cache, compiler=comp)
    assert compiled and rebuilt == data and comp.calls == 2
    if damage != "delete_meta":
        assert "corrupt" in caplog.text


def test_concurrent_builders_compile_once(tmp_path):
    comp = CountingCompiler()
    results = []
    threads = [threading.Thread(target=lambda: results.append(build(SMALL, cache=KernelCache(tmp_path),
                                                                    compiler=comp)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert comp.calls == 1 and len({r[0] for r in results}) == 1


def test_key_covers_template_bytes_spec_and_compiler(monkeypatch):
    ident = "nvrtc-13.5 -std=c++17"
    base = cache_mod.cache_key(SMALL, ident)
    assert cache_mod.cache_key(KernelSpec("fp32", "bf16", v_block=64), ident) != base
    assert cache_mod.cache_key(SMALL, "nvcc-13.0 -std=c++17") != base
    real = cache_mod.template_sources
    monkeypatch.setattr(cache_mod, "template_sources",
                        lambda: {k: v + " " for k, v in real().items()})  # one byte more
    cache_mod._environment_fingerprint.cache_clear()
    try:
        assert cache_mod.cache_key(SMALL, ident) != base
    finally:
        monkeypatch.undo()
        cache_mod._environment_fingerprint.cache_clear()


def vendor_a_copy(tmp_path: Path) -> tuple[Path, str]:
    """This package copied to ``tmp_path/engine/third_party/kda`` (as an engine would vendor it), and the
    PYTHONPATH of a process that can import it beside the installed flash_kda."""
    import shutil
    vendored = tmp_path / "engine" / "third_party" / "kda"
    shutil.copytree(Path(cache_mod.__file__).parents[1], vendored, ignore=shutil.ignore_patterns("__pycache__"))
    for package in (vendored.parent, vendored.parent.parent):
        (package / "__init__.py").write_text("")
    return vendored, str(tmp_path) + os.pathsep + helper_env()["PYTHONPATH"]


def probe_output(probe: str, pythonpath: str, *args: str) -> str:
    """``probe``'s stdout in a fresh interpreter (cache_helpers.python) that can import the vendored copy."""
    result = python(probe, *args, timeout=120, PYTHONPATH=pythonpath)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_vendored_copy_compiles_its_own_templates(tmp_path):
    """An engine that vendors the package under another name (vLLM keeps FLA's kernels in its own tree) hashes
    and compiles that copy's templates, not those of the flash_kda installed beside it (another version's
    parameter layout would be read wrong)."""
    vendored, pythonpath = vendor_a_copy(tmp_path)
    marker = "// the vendored copy\n"
    decode = vendored / "templates" / "kda_decode.cuh"
    decode.write_text(marker + decode.read_text())
    probe = ("import importlib.util, sys\n"
             "from engine.third_party.kda.jit import spec\n"
             "assert importlib.util.find_spec('flash_kda') is not None  # the installed one is there too\n"
             "print(spec.template_sources()['kda_decode.cuh'].startswith(sys.argv[1]))\n")
    assert probe_output(probe, pythonpath, marker) == "True"


def test_a_vendored_copy_and_the_installed_package_share_a_process(tmp_path):
    """Each registers its own custom op and torch.compile traces each copy's fwd to it: with one name for
    both, the copy imported last replaced the other's op, and the installed flash_kda's compiled calls ran
    the vendored copy's code (fails before the namespace came from the package's name)."""
    _, pythonpath = vendor_a_copy(tmp_path)
    probe = ("import torch, flash_kda\n"
             "import engine.third_party.kda as vendored\n"
             "def traced(fwd):\n"
             "    x = torch.zeros(1, 16, 1, 128, dtype=torch.bfloat16)\n"
             "    beta, a_log, dt_bias = torch.zeros(1, 16, 1, dtype=torch.bfloat16), torch.zeros(1), torch.zeros(128)\n"
             "    ops = []\n"
             "    def backend(gm, example_inputs):\n"
             "        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == 'call_function')\n"
             "        return gm.forward\n"
             "    def step(x, beta):\n"
             "        fwd(x, x, x, x, beta, 0.1, x, a_log, dt_bias, -5.0, None, None, None)\n"
             "    try:  # traced, then run on the CPU: the op's implementation refuses CPU tensors\n"
             "        torch.compile(step, fullgraph=True, backend=backend)(x, beta)\n"
             "    except ValueError as exc:\n"
             "        assert 'must be a CUDA tensor' in str(exc), exc\n"
             "    return ops\n"
             "print(vendored.api.OP_NAMESPACE, torch.ops.engine_third_party_kda.fwd.default._schema.name)\n"
             "print(traced(flash_kda.fwd), traced(vendored.fwd))\n")
    assert probe_output(probe, pythonpath).splitlines() == [
        "engine_third_party_kda engine_third_party_kda::fwd",
        "['flash_kda.fwd'] ['engine_third_party_kda.fwd']"]


def test_disable_jit_turns_a_miss_into_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_KDA_DISABLE_JIT", "1")
    with pytest.raises(CacheMissError, match=r"kda_fwd_bounded.*python -m flash_kda precompile --arch sm_90a"):
        build(SMALL, cache=KernelCache(tmp_path), compiler=CountingCompiler())


def test_compile_error_carries_log_and_entry_path(tmp_path, monkeypatch):
    monkeypatch.setattr(KernelSpec, "source", lambda self: "this is not CUDA;\n")
    with pytest.raises(CompileError) as info:
        build(SMALL, cache=KernelCache(tmp_path), compiler=NVRTCCompiler())
    assert "error" in info.value.log and str(tmp_path) in str(info.value) and info.value.spec_name == SMALL.name


def test_compiler_newer_than_driver_is_refused(monkeypatch):
    from flash_kda.jit import runtime
    monkeypatch.setattr(runtime, "driver_version", lambda: (12, 8))
    with pytest.raises(RuntimeError, match=r"CUDA 13.5 but the driver supports CUDA 12.8.*nvidia-cuda-nvrtc==12"):
        runtime.check_compiler_fits_driver((13, 5), "nvrtc")
    runtime.check_compiler_fits_driver((12, 9), "nvrtc")  # minor-version compatibility: fine


def test_compiler_choice(monkeypatch):
    assert get_compiler().name == "nvrtc"
    monkeypatch.setenv("FLASH_KDA_COMPILER", "nvcc")
    assert get_compiler().name == "nvcc"
    monkeypatch.setenv("FLASH_KDA_COMPILER", "clang")
    with pytest.raises(ValueError, match=r"^flash_kda: FLASH_KDA_COMPILER must be one of nvrtc, nvcc, got 'clang'$"):
        get_compiler()


@pytest.mark.skipif(not any(Path(p, "nvcc").is_file() for p in os.environ.get("PATH", "").split(os.pathsep)),
                    reason="nvcc not on PATH")
def test_nvcc_compiles_one_specialisation(tmp_path):
    cubin, _, compiled = build(SMALL, cache=KernelCache(tmp_path), compiler=get_compiler("nvcc"))
    assert compiled and _is_cubin(cubin)


def test_precompile_api_reports_every_entry(baked_cache):
    import flash_kda
    entries = flash_kda.precompile(archs="all", cache_dir=baked_cache)
    assert len(entries) == len(ALL_SPECS) and not any(e.compiled for e in entries)  # compiled above
    hopper = flash_kda.precompile(archs=["sm_90a", "sm_90a"], cache_dir=baked_cache)
    assert {e.spec.arch for e in hopper} == {"sm_90a"} and len(hopper) == len(list(all_specs(("sm_90a",))))


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flash_kda", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


def test_cli_precompile_info_and_clear(baked_cache, tmp_path):
    res = _cli("precompile", "--arch", "all", "--cache-dir", str(baked_cache))
    assert res.returncode == 0, res.stderr
    assert f"{len(ALL_SPECS)} entries (0 compiled, {len(ALL_SPECS)} already cached)" in res.stdout
    res = _cli("precompile", "--arch", "sm_86", "--arch", "sm_120a", "--cache-dir", str(baked_cache))
    n_two = len(list(all_specs(("sm_86", "sm_120a"))))
    assert res.returncode == 0 and f"{n_two} entries (0 compiled, {n_two} already cached)" in res.stdout, res.stderr
    res = _cli("info", "--cache-dir", str(baked_cache))
    assert res.returncode == 0 and f"({len(ALL_SPECS)} entries" in res.stdout and "nvidia-cutlass" in res.stdout
    for arch in ALL_TARGETS:  # the support table: each target, its variant and where it was validated
        assert f"{arch} (compute capability" in res.stdout
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(baked_cache, copy)
    res = _cli("clear-cache", "--cache-dir", str(copy))
    assert res.returncode == 0 and f"removed {len(ALL_SPECS)} entries" in res.stdout


def test_spill_check_refuses_a_kernel_that_spills(monkeypatch):
    report = ("ptxas info    : Function properties for flash_kda_fwd_kernel\n"
              "ptxas         .     8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads")
    monkeypatch.setattr(NVRTCCompiler, "_compile", lambda self, spec, ptx, verbose: (b"cubin", report if verbose else ""))
    assert NVRTCCompiler().compile(SMALL) == b"cubin"  # the check is off by default
    monkeypatch.setenv("FLASH_KDA_JIT_CHECK_SPILLS", "1")
    for arch in ("sm_90a", "sm_120a"):  # every target: no allowance anywhere
        with pytest.raises(CompileError, match=rf"spills 8 bytes to local memory on {arch}") as excinfo:
            NVRTCCompiler().compile(KernelSpec("fp32", "fp32", v_block=64, arch=arch))
        assert "8 bytes spill stores" in str(excinfo.value)


def test_spill_check_fails_a_compile_without_a_report_and_precompile_bypasses_the_compute_cache(monkeypatch):
    """NVRTC 13 returns no ptxas report for a cubin it takes from the CUDA compute cache (an earlier compile
    of the same kernel on the machine): the check must not pass such a compile unchecked, and says how to
    get the report; precompile's workers run past the cache when the check is on."""
    from flash_kda.precompile import _worker_environment
    monkeypatch.setattr(NVRTCCompiler, "_compile", lambda *args, **kwargs: (b"cubin", ""))
    monkeypatch.setenv("FLASH_KDA_JIT_CHECK_SPILLS", "1")
    with pytest.raises(CompileError, match=r"no ptxas report to check(.|\n)*CUDA_CACHE_DISABLE=1"):
        NVRTCCompiler().compile(SMALL)
    for check, expected in (("0", None), ("1", "1")):
        monkeypatch.setenv("FLASH_KDA_JIT_CHECK_SPILLS", check)
        monkeypatch.delenv("CUDA_CACHE_DISABLE", raising=False)
        monkeypatch.delenv("FLASH_KDA_JIT_PCH", raising=False)
        _worker_environment()
        assert os.environ.get("CUDA_CACHE_DISABLE") == expected and os.environ["FLASH_KDA_JIT_PCH"] == "1"


def test_dump_writes_source_ptx_report_and_cubin(tmp_path, monkeypatch):
    """FLASH_KDA_JIT_DUMP with a real NVRTC compile (the one-group decode kernel, the smallest)."""
    monkeypatch.setenv("FLASH_KDA_JIT_DUMP", str(tmp_path))
    spec = DecodeSpec(state_in="bf16", state_out="bf16")
    cubin = NVRTCCompiler().compile(spec)
    entry = tmp_path / spec.name
    assert (entry / "source.cu").read_text() == spec.source()
    assert (entry / "kernel.cubin").read_bytes() == cubin
    assert ".entry" in (entry / "kernel.ptx").read_text()
    assert "0 bytes spill stores" in (entry / "ptxas.log").read_text()


def test_lineinfo_changes_the_identity_and_so_the_key(monkeypatch):
    compiler = NVRTCCompiler()
    plain = compiler.identity(SMALL)
    monkeypatch.setenv("FLASH_KDA_JIT_LINEINFO", "1")
    assert compiler.identity(SMALL) == plain.replace(" -DNDEBUG", " -DNDEBUG -lineinfo")
