"""The cache as an attacker and a deployment see it, with real files, permissions, processes and
uids: the loader never runs a cubin this user did not build or could not trust, and deployment
paths (read-only images, other users, concurrent clear-cache) work or fail loudly.

Tests that switch uid, chown or mount need root and are skipped with that reason otherwise; CI
runs as root."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import filelock
import pytest
from filelock import FileLock

from flash_kda.errors import CacheMissError, CacheWriteError
from flash_kda.jit import KernelCache, KernelSpec, build
from flash_kda.jit import cache as cache_mod
from flash_kda.jit import headers
from flash_kda.jit.cache import cache_key
from flash_kda.jit.compiler import NVRTCCompiler

from cache_helpers import OTHER_UID, THIRD_UID, FakeCompiler, env, needs_root, python, run_as

SPEC = KernelSpec("fp32", "fp32", v_block=64)
OTHER = KernelSpec("bf16", "bf16", v_block=32)
TESTS = Path(__file__).resolve().parent


def key_of(spec: KernelSpec, comp) -> str:
    return cache_key(spec, comp.identity(spec), comp.header_digest())


def plant_entry(root: Path, spec: KernelSpec, key: str, data: bytes) -> Path:
    """A complete, self-consistent entry written by hand (what an attacker with write access could do)."""
    path = root / spec.name / f"{key}.cubin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    meta = {"spec": spec.to_dict(), "key": key, "compiler": "x", "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


@pytest.fixture
def shared_root():
    """A directory every uid can traverse (pytest's tmp_path is private to its user), removed after."""
    root = Path(tempfile.mkdtemp(prefix="flash_kda-test-", dir="/tmp" if os.path.isdir("/tmp") else None))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def system_tmp(shared_root, monkeypatch) -> Path:
    """A sticky, world-writable directory standing in for /tmp (what tempfile.gettempdir returns)."""
    tmp = shared_root / "systmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def unwritable_dir(tmp_path: Path) -> Path:
    """A cache directory nobody can create, root included: its parent is a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return blocker / "cache"


# ------------------------------------------------------------------ 1. the private fallback directory


@needs_root
def test_a_fallback_directory_planted_by_another_user_is_refused(shared_root, system_tmp):
    victim, attacker = OTHER_UID, THIRD_UID
    comp, evil = FakeCompiler(b" victim"), FakeCompiler(b" EVIL")
    planted = system_tmp / f"flash_kda-cache-{victim}"

    def plant():  # the predictable fallback of the victim, made first, world-writable, with a cubin
        os.mkdir(planted)
        os.chmod(planted, 0o777)
        plant_entry(planted, SPEC, key_of(SPEC, comp), evil.compile(SPEC))
    run_as(attacker, plant)

    image = shared_root / "image"  # the victim's cache: root's, read-only for the victim -> fallback
    image.mkdir(mode=0o755)

    def use():
        cache = KernelCache(image)
        data, path, compiled = build(SPEC, cache=cache, compiler=comp)
        _, other_path, _ = build(OTHER, cache=cache, compiler=comp)
        fallback = path.parents[1]
        return data, str(path), compiled, str(other_path), os.stat(fallback).st_mode & 0o777, os.stat(fallback).st_uid
    data, path, compiled, other_path, mode, owner = run_as(victim, use)
    assert compiled and b"EVIL" not in data and data.endswith(b" victim")
    assert not path.startswith(f"{planted}/") and not other_path.startswith(f"{planted}/")
    assert Path(path).parents[1].name.startswith(f"flash_kda-cache-{victim}-")  # a fresh mkdtemp directory
    assert (mode, owner) == (0o700, victim)
    assert sorted(p.name for p in planted.rglob("*.cubin")) == [f"{key_of(SPEC, comp)}.cubin"]  # nothing added


@pytest.mark.parametrize("loosened_mode", [0o777, 0o755])
def test_the_private_fallback_is_checked_again_on_every_use(tmp_path, system_tmp, loosened_mode):
    comp = FakeCompiler()
    cache = KernelCache(unwritable_dir(tmp_path))
    _, first, _ = build(SPEC, cache=cache, compiler=comp)
    private = system_tmp / f"flash_kda-cache-{os.getuid()}"
    assert first.parents[1] == private and private.stat().st_mode & 0o777 == 0o700
    private.chmod(loosened_mode)  # someone loosened it since
    _, second, compiled = build(OTHER, cache=cache, compiler=comp)
    assert compiled and second.parents[1] != private and second.parents[1].stat().st_mode & 0o777 == 0o700
    fresh = KernelCache(unwritable_dir(tmp_path))  # a new process: the loosened directory is not read either
    data, path, compiled = build(SPEC, cache=fresh, compiler=comp)
    assert compiled and path.parents[1] != private


# ------------------------------------------------------------------ 2. the trust rule


def _loosen(cache_dir: Path, how: str) -> None:
    entry = next(cache_dir.glob("kda_*/*.cubin"))
    if how == "root 0777":
        cache_dir.chmod(0o777)
    elif how == "root 1777":
        cache_dir.chmod(0o1777)
    elif how == "root 0775":
        cache_dir.chmod(0o775)
    elif how == "entry dir 0777":
        entry.parent.chmod(0o777)
    elif how == "cubin 0666":
        entry.chmod(0o666)
    elif how == "json 0662":
        entry.with_suffix(".json").chmod(0o662)
    elif how == "owned by another user":
        os.chown(cache_dir, OTHER_UID, OTHER_UID)
    elif how == "cubin is a symlink":
        target = cache_dir.parent / "elsewhere.cubin"
        shutil.move(entry, target)
        entry.symlink_to(target)


LOOSENED = ["root 0777", "root 1777", "root 0775", "entry dir 0777", "cubin 0666", "json 0662",
            pytest.param("owned by another user", marks=needs_root), "cubin is a symlink"]


@pytest.mark.parametrize("how", LOOSENED)
def test_an_untrusted_cache_is_not_loaded_but_compiled_privately(tmp_path, system_tmp, monkeypatch, caplog, how):
    cache_dir = tmp_path / "shared"
    build(SPEC, cache=KernelCache(cache_dir), compiler=FakeCompiler(b" planted"))
    _loosen(cache_dir, how)
    data, path, compiled = build(SPEC, cache=KernelCache(cache_dir), compiler=FakeCompiler(b" mine"))
    assert compiled and data.endswith(b" mine") and not path.is_relative_to(cache_dir)
    assert "not loading kernels from" in caplog.text and "must be owned by you or root" in caplog.text
    monkeypatch.setenv("FLASH_KDA_CACHE_TRUST", "any")  # the documented opt-out
    data, path, compiled = build(SPEC, cache=KernelCache(cache_dir), compiler=FakeCompiler(b" mine"))
    assert not compiled and data.endswith(b" planted") and path.is_relative_to(cache_dir)


def test_a_trusted_cache_is_loaded(tmp_path):
    cache_dir = tmp_path / "mine"
    build(SPEC, cache=KernelCache(cache_dir), compiler=FakeCompiler(b" first"))
    data, path, compiled = build(SPEC, cache=KernelCache(cache_dir), compiler=FakeCompiler(b" second"))
    assert not compiled and data.endswith(b" first")
    assert oct(cache_dir.stat().st_mode & 0o777) == oct(0o755 & ~cache_mod._umask())


# ------------------------------------------------------------------ 3. entry identity


def test_a_swapped_entry_is_not_served_and_is_rebuilt(tmp_path, caplog):
    cache, comp = KernelCache(tmp_path), FakeCompiler()
    a_data, a_path, _ = build(SPEC, cache=cache, compiler=comp)
    _, b_path, _ = build(OTHER, cache=cache, compiler=comp)
    # another specialisation's cubin and JSON copied over the entry
    shutil.copy(b_path, a_path)
    shutil.copy(b_path.with_suffix(".json"), a_path.with_suffix(".json"))
    data, _, compiled = build(SPEC, cache=cache, compiler=comp)
    assert compiled and data == a_data and "holds another kernel" in caplog.text
    # the other cubin under this entry's own JSON, its size and checksum fixed up
    shutil.copy(b_path, a_path)
    meta = json.loads(a_path.with_suffix(".json").read_text())
    meta.update(size=b_path.stat().st_size, sha256=hashlib.sha256(b_path.read_bytes()).hexdigest())
    a_path.with_suffix(".json").write_text(json.dumps(meta))
    caplog.clear()
    data, _, compiled = build(SPEC, cache=KernelCache(tmp_path), compiler=comp)
    assert compiled and data == a_data and "does not carry the name" in caplog.text
    assert comp.calls == 4


# ------------------------------------------------------------------ 4. lock files


def test_a_lock_file_planted_as_a_symlink_is_refused(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    cache, comp = KernelCache(tmp_path / "cache"), FakeCompiler()
    lock = cache.entry_path(SPEC, key_of(SPEC, comp)).with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    lock.symlink_to(precious)
    with pytest.raises(CacheWriteError, match="is a symbolic link"):
        build(SPEC, cache=cache, compiler=comp)
    assert precious.read_text() == "keep me" and comp.calls == 0


def test_the_installed_filelock_never_truncates_through_a_symlink(tmp_path):
    """The dependency floor (filelock >= 3.20.1): filelock itself refuses a symlinked lock file."""
    assert tuple(int(x) for x in filelock.__version__.split(".")[:3]) >= (3, 20, 1)
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    link = tmp_path / "entry.lock"
    link.symlink_to(precious)
    try:
        with FileLock(str(link), timeout=1):
            pass
    except Exception:  # noqa: BLE001 - refusing is what we want
        pass
    assert precious.read_text() == "keep me"


# ------------------------------------------------------------------ 5. header bytes in the key


def test_editing_a_header_changes_the_key(tmp_path, monkeypatch):
    comp = NVRTCCompiler()
    base = key_of(SPEC, comp)
    real = headers.include_dirs(True)
    shadow = tmp_path / "include"
    nested = "cute/arch/mma_sm80.hpp"  # reached only through the templates' includes
    (shadow / nested).parent.mkdir(parents=True)
    shutil.copy(Path(real[0]) / nested, shadow / nested)
    monkeypatch.setattr(headers, "include_dirs", lambda toolkit_headers=True: (str(shadow), *real))
    keys = []
    try:
        for edit in (b"", b"\n// edited\n"):
            (shadow / nested).write_bytes((shadow / nested).read_bytes() + edit)
            headers.header_digest.cache_clear()
            keys.append(key_of(SPEC, comp))
    finally:
        headers.header_digest.cache_clear()
    assert keys[0] == base  # the same bytes elsewhere: the same key (paths are not hashed, bytes are)
    assert keys[1] != base  # one edited byte in a nested header: another key


# ------------------------------------------------------------------ 6. a cache baked by one user, read by another


@needs_root
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_a_cache_baked_by_root_is_readable_by_another_user(shared_root, umask):
    image = shared_root / "image"
    comp = FakeCompiler(b" baked")
    old = os.umask(umask)
    cache_mod._umask.cache_clear()
    try:
        _, path, _ = build(SPEC, cache=KernelCache(image), compiler=comp)
    finally:
        os.umask(old)
        cache_mod._umask.cache_clear()
    for p in (path, path.with_suffix(".json")):
        assert p.stat().st_mode & 0o777 == 0o644, oct(p.stat().st_mode)
    for d in (image, path.parent):
        assert d.stat().st_mode & 0o777 == 0o755, oct(d.stat().st_mode)

    def load():  # as another user, compiles forbidden: a hit or an error
        data, found, compiled = build(SPEC, cache=KernelCache(image), compiler=FakeCompiler(), allow_build=False)
        return data, str(found), compiled
    data, found, compiled = run_as(OTHER_UID, load)
    assert not compiled and data.endswith(b" baked") and found == str(path)


# ------------------------------------------------------------------ 8. a hit needs no writable directory

HIT_IN_READ_ONLY_WORLD = textwrap.dedent("""
    import sys, tempfile
    sys.path.insert(0, sys.argv[2])
    from cache_helpers import FakeCompiler
    from flash_kda.errors import CacheWriteError
    from flash_kda.jit import KernelCache, KernelSpec, build
    try:
        tempfile.gettempdir()
        print("a temporary directory is writable")
    except FileNotFoundError:
        print("no writable temporary directory")
    cache = KernelCache(sys.argv[1])
    data, path, compiled = build(KernelSpec("fp32", "fp32", v_block=64), cache=cache, compiler=FakeCompiler())
    print("hit" if not compiled and data.endswith(b" baked") else "NOT A HIT")
    try:
        build(KernelSpec("bf16", "bf16", v_block=32), cache=cache, compiler=FakeCompiler())
    except CacheWriteError as exc:
        print("miss:", exc)
""")


@needs_root
def test_a_hit_needs_no_writable_directory(tmp_path):
    """A baked read-only cache on a read-only root: /tmp, /var/tmp, the cache and the working
    directory are read-only bind mounts in a private mount namespace."""
    image = tmp_path / "image"
    build(SPEC, cache=KernelCache(image), compiler=FakeCompiler(b" baked"))
    read_only = " ".join(f"mount --bind {d} {d} && mount -o remount,bind,ro {d} &&"
                         for d in ("/tmp", "/var/tmp", str(image)) if os.path.isdir(d))
    cmd = f'{read_only} cd {image} && exec "$0" -c "$1" "$2" "$3"'
    res = subprocess.run(["unshare", "-m", "sh", "-c", cmd, sys.executable, HIT_IN_READ_ONLY_WORLD, str(image),
                          str(TESTS)], capture_output=True, text=True, timeout=300,
                         env=env(TMPDIR=None, TEMP=None, TMP=None))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[:2] == ["no writable temporary directory", "hit"], res.stdout + res.stderr
    assert "no private temporary directory can be made" in lines[2]  # a miss says what to do


# ------------------------------------------------------------------ 11. clear-cache during precompile; killed parents

PRECOMPILE_SOME = textwrap.dedent("""
    import sys
    import flash_kda
    from flash_kda.jit import all_specs
    specs = [s for s in all_specs() if getattr(s, "v_block", None) == 64][:6]
    entries = flash_kda.precompile(cache_dir=sys.argv[1], specs=specs, workers=2)
    print("precompiled", len(entries))
""")


def test_clear_cache_during_precompile_does_not_break_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", PRECOMPILE_SOME, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    cleared = 0
    while proc.poll() is None:
        cleared += KernelCache(tmp_path).clear()
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 0 and "precompiled 6" in out, err[-3000:]
    assert "Traceback" not in err and cleared >= 1


class _LockMeetingAClear:
    """filelock's FileLock whose first acquisition meets a concurrent clear-cache the way CI once saw it:
    pathlib's mkdir(exist_ok=True) (filelock makes the lock's directory) finds the entry's directory, which is
    removed before it checks it, and raises FileExistsError for a directory that is gone. ``blocker`` instead
    names a regular file in the error, as if something other than a directory held the name."""
    calls = 0
    blocker: Path | None = None

    def __init__(self, lock_file: str):
        self.lock_file, self.lock = lock_file, FileLock(lock_file)

    def __enter__(self):
        type(self).calls += 1
        if type(self).calls == 1:
            directory = os.path.dirname(self.lock_file)
            if self.blocker is not None:
                directory = str(self.blocker)
            else:
                shutil.rmtree(directory)
            raise FileExistsError(17, "File exists", directory)
        return self.lock.__enter__()

    def __exit__(self, *exc_info):
        return self.lock.__exit__(*exc_info)


def test_an_entry_directory_removed_under_the_lock_is_made_again(tmp_path, monkeypatch):
    """The race behind CI's one red run (fifteenth session): a clear-cache between filelock's mkdir and its
    check. The build tries again, publishes, and says nothing."""
    monkeypatch.setattr(_LockMeetingAClear, "calls", 0)
    monkeypatch.setattr(cache_mod, "FileLock", _LockMeetingAClear)
    cache = KernelCache(tmp_path)
    cubin, path, built = build(SPEC, cache=cache, compiler=FakeCompiler(b" raced"))
    assert built and path.is_file() and _LockMeetingAClear.calls == 2
    assert cache.lookup(SPEC, path.stem) is not None


def test_a_name_held_by_a_file_under_the_lock_is_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    monkeypatch.setattr(_LockMeetingAClear, "calls", 0)
    monkeypatch.setattr(_LockMeetingAClear, "blocker", blocker)
    monkeypatch.setattr(cache_mod, "FileLock", _LockMeetingAClear)
    with pytest.raises(CacheWriteError, match="blocker: it exists and is not a directory"):
        build(SPEC, cache=KernelCache(tmp_path / "cache"), compiler=FakeCompiler(b" blocked"))


def _children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_killing_precompile_ends_its_worker_processes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "flash_kda", "precompile", "--cache-dir", str(tmp_path),
                             "--jobs", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while len(workers) < 2 and time.monotonic() < deadline:  # the pool's workers (and its resource tracker)
        time.sleep(0.2)
        workers = _children(proc.pid)
    assert len(workers) >= 2, "no worker processes appeared"
    time.sleep(1.0)  # let them start compiling
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), f"workers {workers} outlived their killed parent"


# ------------------------------------------------------------------ 15. a miss under FLASH_KDA_DISABLE_JIT


class FakeNvcc(FakeCompiler):
    name = "nvcc"


def test_a_miss_under_disable_jit_names_the_compiler_and_creates_nothing(tmp_path, system_tmp, monkeypatch):
    monkeypatch.setenv("FLASH_KDA_DISABLE_JIT", "1")
    target = tmp_path / "missing" / "cache"
    with pytest.raises(CacheMissError) as info:
        build(SPEC, cache=KernelCache(target), compiler=FakeNvcc())
    message = str(info.value)
    assert f"precompile --arch sm_90a --cache-dir {target} --compiler nvcc" in message
    assert "the compiler and its version" in message
    assert not (tmp_path / "missing").exists() and list(system_tmp.iterdir()) == []
    with pytest.raises(CacheMissError) as info:  # the default compiler needs no --compiler
        build(SPEC, cache=KernelCache(target), compiler=FakeCompiler())
    assert str(info.value).endswith(f"--cache-dir {target}")


# ------------------------------------------------------------------ 16. operator warnings on stderr, once

TWO_PROCESS_LOOKUPS = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from cache_helpers import FakeCompiler
    from flash_kda.jit import KernelCache, KernelSpec, build
    for spec in [KernelSpec("fp32", "fp32", v_block=64), KernelSpec("bf16", "bf16", v_block=32)] * 2:
        build(spec, cache=KernelCache(sys.argv[1]), compiler=FakeCompiler())
""")


def test_operator_warnings_reach_stderr_once_without_any_logging_setup(tmp_path):
    shared = tmp_path / "shared"
    build(SPEC, cache=KernelCache(shared), compiler=FakeCompiler())
    build(OTHER, cache=KernelCache(shared), compiler=FakeCompiler())
    shared.chmod(0o777)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    res = python(TWO_PROCESS_LOOKUPS, shared, TESTS, TMPDIR=str(private_tmp))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count(f"not loading kernels from {shared}") == 1, res.stderr
    assert res.stderr.count(f"not using the cache directory {shared}") == 1, res.stderr
    shared.chmod(0o755)
    for entry in shared.glob("kda_*/*.cubin"):
        entry.write_bytes(entry.read_bytes()[:-1] + b"!")  # corrupt both entries
    res = python(TWO_PROCESS_LOOKUPS, shared, TESTS, TMPDIR=str(private_tmp))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count(": corrupt (size or checksum mismatch); rebuilding it") == 2, res.stderr  # one per entry
    assert len(res.stderr.strip().splitlines()) == 2
