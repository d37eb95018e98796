"""The cache under real processes: races, a killed lock holder, a read-only directory, a copied cache."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flash_kda.jit import CacheMissError, KernelCache, KernelSpec, build
from flash_kda.jit.cache import cache_key
from flash_kda.jit.compiler import NVRTCCompiler

ROOT = Path(__file__).resolve().parent.parent
SPEC_ARGS = "'bf16', 'fp32', False, v_block=128"

BUILD_ONE = textwrap.dedent(f"""
    import sys
    from flash_kda.jit import KernelCache, KernelSpec, build
    from flash_kda.jit.compiler import NVRTCCompiler
    cubin, path, compiled = build(KernelSpec({SPEC_ARGS}), cache=KernelCache(sys.argv[1]), compiler=NVRTCCompiler())
    print("compiled" if compiled else "cached", len(cubin))
""")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def test_eight_processes_racing_on_one_entry_compile_it_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_ONE, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(8)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    words = [r[0].split()[0] for r in results]
    assert words.count("compiled") == 1 and words.count("cached") == 7
    assert len({r[0].split()[1] for r in results}) == 1  # everyone got the same cubin


def test_a_killed_lock_holder_does_not_block_anyone(tmp_path):
    spec = KernelSpec("bf16", "fp32", False, v_block=128)
    comp = NVRTCCompiler()
    cache = KernelCache(tmp_path)
    lock_path = cache.entry_path(spec, cache_key(spec, comp.identity(spec))).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from filelock import FileLock
        lock = FileLock({str(lock_path)!r}); lock.acquire(); print("locked", flush=True); time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)  # dies holding the lock; the lock file stays behind
    holder.wait()
    assert lock_path.exists()
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-c", BUILD_ONE, str(tmp_path)], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("compiled"), res.stderr[-2000:]
    assert time.monotonic() - start < 120


def _make_read_only(src: Path, mnt: Path):
    """A real read-only view of ``src`` at ``mnt``: a read-only bind mount as root (root ignores
    permission bits), plain permission bits otherwise. Returns the undo function."""
    mnt.mkdir()
    if os.getuid() == 0:
        subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(mnt)], check=True)
        return lambda: subprocess.run(["umount", str(mnt)], check=True)
    shutil.rmtree(mnt)
    shutil.copytree(src, mnt)
    for p in [mnt, *mnt.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return lambda: [p.chmod(0o755) for p in [mnt, *mnt.rglob("*")]]


def test_read_only_cache_dir_serves_hits_and_falls_back_for_misses(tmp_path):
    src = tmp_path / "baked"
    build(KernelSpec("bf16", "fp32", False, v_block=128), cache=KernelCache(src), compiler=NVRTCCompiler())
    ro = tmp_path / "ro"
    undo = _make_read_only(src, ro)
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
        _, path, compiled = build(KernelSpec('none', 'none', True, v_block=32), cache=cache, compiler=NVRTCCompiler())
        print("miss", compiled, path.is_relative_to(sys.argv[1]), path.is_relative_to(sys.argv[2]))
    """)
    try:
        assert not os.access(ro, os.W_OK)
        res = subprocess.run([sys.executable, "-c", script, str(ro), str(private)], capture_output=True, text=True,
                             timeout=300, env=_env(TMPDIR=str(private)))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "hit False True" in res.stdout
        assert "miss True False True" in res.stdout  # compiled into the private per-user directory
        assert "is not writable" in res.stderr
    finally:
        undo()


def test_a_cache_precompiled_elsewhere_works_when_copied(tmp_path):
    import flash_kda
    spec = KernelSpec("fp32", "bf16", True, v_block=64)
    flash_kda.precompile(cache_dir=tmp_path / "build", specs=[spec], compiler="nvrtc", workers=1)
    shutil.copytree(tmp_path / "build", tmp_path / "image")
    cubin, path, compiled = build(spec, cache=KernelCache(tmp_path / "image"), compiler=NVRTCCompiler(),
                                  allow_build=False)
    assert not compiled and path.is_relative_to(tmp_path / "image")
    with pytest.raises(CacheMissError):
        build(KernelSpec("fp32", "none", True, v_block=64), cache=KernelCache(tmp_path / "image"),
              compiler=NVRTCCompiler(), allow_build=False)
