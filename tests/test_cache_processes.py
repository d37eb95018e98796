"""The cache under real processes: races, a killed lock holder, a read-only directory, a copied cache."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from flash_kda.errors import CacheMissError
from flash_kda.jit import KernelCache, KernelSpec, build
from flash_kda.jit.cache import cache_key
from flash_kda.jit.compiler import NVRTCCompiler

from cache_helpers import IS_ROOT, env, read_only_view

SPEC_ARGS = "'bf16', 'fp32', v_block=128"

BUILD_ONE = textwrap.dedent(f"""
    import sys
    from flash_kda.jit import KernelCache, KernelSpec, build
    from flash_kda.jit.compiler import NVRTCCompiler
    cubin, path, compiled = build(KernelSpec({SPEC_ARGS}), cache=KernelCache(sys.argv[1]), compiler=NVRTCCompiler())
    print("compiled" if compiled else "cached", len(cubin))
""")


def test_eight_processes_racing_on_one_entry_compile_it_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_ONE, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env()) for _ in range(8)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    words = [r[0].split()[0] for r in results]
    assert words.count("compiled") == 1 and words.count("cached") == 7
    assert len({r[0].split()[1] for r in results}) == 1  # everyone got the same cubin


def test_a_killed_lock_holder_does_not_block_anyone(tmp_path):
    spec = KernelSpec("bf16", "fp32", v_block=128)
    comp = NVRTCCompiler()
    cache = KernelCache(tmp_path)
    lock_path = cache.entry_path(spec, cache_key(spec, comp.identity(spec), comp.header_digest())).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from filelock import FileLock
        lock = FileLock({str(lock_path)!r}); lock.acquire(); print("locked", flush=True); time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env=env())
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)  # dies holding the lock; the lock file stays behind
    holder.wait()
    assert lock_path.exists()
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-c", BUILD_ONE, str(tmp_path)], capture_output=True, text=True,
                         env=env(), timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("compiled"), res.stderr[-2000:]
    assert time.monotonic() - start < 120


def test_read_only_cache_dir_serves_hits_and_falls_back_for_misses(tmp_path):
    src = tmp_path / "baked"
    build(KernelSpec("bf16", "fp32", v_block=128), cache=KernelCache(src), compiler=NVRTCCompiler())
    private = tmp_path / "tmp"
    private.mkdir()
    script = textwrap.dedent(f"""
        import logging, os, sys
        logging.basicConfig(level=logging.WARNING)
        from flash_kda.jit import KernelCache, KernelSpec, build
        from flash_kda.jit.compiler import NVRTCCompiler
        cache = KernelCache(sys.argv[1])
        _, path, compiled = build(KernelSpec({SPEC_ARGS}), cache=cache, compiler=NVRTCCompiler())
        print("hit", compiled, path.is_relative_to(sys.argv[1]))
        _, path, compiled = build(KernelSpec('bf16', 'fp32', v_block=32), cache=cache, compiler=NVRTCCompiler())
        print("miss", compiled, path.is_relative_to(sys.argv[1]), path.is_relative_to(sys.argv[2]))
    """)
    with read_only_view(src, tmp_path / "ro") as ro:
        assert not os.access(ro, os.W_OK) or IS_ROOT
        res = subprocess.run([sys.executable, "-c", script, str(ro), str(private)], capture_output=True, text=True,
                             timeout=300, env=env(TMPDIR=str(private)))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "hit False True" in res.stdout
        assert "miss True False True" in res.stdout  # compiled into the private per-user directory
        assert "cannot write the cache directory" in res.stderr


def test_a_cache_precompiled_elsewhere_works_when_copied(tmp_path):
    import flash_kda
    spec = KernelSpec("fp32", "bf16", v_block=64)
    flash_kda.precompile(cache_dir=tmp_path / "build", specs=[spec], compiler="nvrtc", workers=1)
    shutil.copytree(tmp_path / "build", tmp_path / "image")
    cubin, path, compiled = build(spec, cache=KernelCache(tmp_path / "image"), compiler=NVRTCCompiler(),
                                  allow_build=False)
    assert not compiled and path.is_relative_to(tmp_path / "image")
    with pytest.raises(CacheMissError):
        build(KernelSpec("bf16", "bf16", v_block=64), cache=KernelCache(tmp_path / "image"),
              compiler=NVRTCCompiler(), allow_build=False)
