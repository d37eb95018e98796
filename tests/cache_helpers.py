"""Shared by the cache tests: a fake compiler, running code as a second uid, read-only mounts, the CLI."""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest

from flash_kda.jit.compiler import NVRTCCompiler
from flash_kda.jit.spec import KERNEL_NAME

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "getuid") and os.getuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="switching to a second uid, mounting and chown need root")
OTHER_UID = 65534   # nobody: the second user
THIRD_UID = 65533   # a third user (an attacker beside the victim)


class FakeCompiler(NVRTCCompiler):
    """Counts compiles and returns a small fake cubin that carries the spec's identity tag; its
    version and header digest are fixed, so it reads no file (usable after a switch of uid)."""

    def __init__(self, marker: bytes = b""):
        super().__init__()
        self.calls = 0
        self.marker = marker

    def version(self) -> tuple[int, int]:
        return (13, 0)

    def header_digest(self) -> str:
        return "fake-headers"

    def flags(self, spec) -> list[str]:
        return ["--fake", f"--gpu-architecture={spec.arch}"]

    def compile(self, spec):
        self.calls += 1
        return b"\x7fELF fake cubin " + spec.identity_tag() + b" " + KERNEL_NAME.encode() + self.marker


def run_as(uid: int, fn: Callable[[], object], *, umask: int | None = None):
    """Run ``fn`` in a forked child as ``uid`` (gid the same, no supplementary groups); return its
    result, or re-raise its exception here. The child runs code already imported: it needs no
    access to the checkout or the virtual environment."""
    from flash_kda.jit.cache import _environment_fingerprint
    _environment_fingerprint()  # reads the package's templates: do it while this uid can
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if umask is not None:
                os.umask(umask)
            payload = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 - carried back to the parent
            payload = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        with os.fdopen(write, "wb") as f:
            pickle.dump(payload, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status == "error":
        raise AssertionError(f"in the child running as uid {uid}: {value}")
    return value


@contextlib.contextmanager
def read_only_view(src: Path, mnt: Path):
    """``mnt``: a read-only view of ``src``: a read-only bind mount as root (root ignores permission
    bits), a copy with the write bits removed otherwise."""
    if IS_ROOT:
        mnt.mkdir()
        subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    else:
        shutil.copytree(src, mnt)
        for p in [mnt, *mnt.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield mnt
        finally:
            for p in [mnt, *mnt.rglob("*")]:
                p.chmod(0o755)


def env(**extra) -> dict:
    out = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("FLASH_KDA_LOG_LEVEL", "FLASH_KDA_CACHE_TRUST", "FLASH_KDA_DISABLE_JIT", "FLASH_KDA_COMPILER"):
        out.pop(name, None)
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def cli(*args, timeout=900, **extra_env) -> subprocess.CompletedProcess:
    """``python -m flash_kda ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "flash_kda", *args], capture_output=True, text=True,
                          env=env(**extra_env), timeout=timeout, cwd=ROOT)


def python(script: str, *args, timeout=900, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=env(**extra_env), timeout=timeout, cwd=ROOT)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    return lines[0]
