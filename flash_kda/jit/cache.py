"""On-disk kernel cache: content-addressed entries, a file lock per entry, atomic publish.

Layout: ``<cache_dir>/<spec name>/<key>.cubin`` plus ``<key>.json`` (metadata with the
cubin's SHA-256). The JSON is published last by atomic rename, so an entry is visible
only when complete; a cubin whose checksum does not match is rebuilt with a warning.
Locks are OS-level (``filelock``, flock on POSIX): a killed holder releases its lock.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Callable

from filelock import FileLock

from .spec import KernelSpec, template_sources

log = logging.getLogger("flash_kda.jit")


class CacheMissError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    if os.environ.get("FLASH_KDA_CACHE_DIR"):
        return Path(os.environ["FLASH_KDA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flash_kda"


def _private_fallback_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"flash_kda-cache-{uid}"


@functools.lru_cache(maxsize=None)
def _environment_fingerprint() -> str:
    """Bytes that change the binary but are not in the spec: templates and header packages."""
    h = hashlib.sha256()
    from .. import __version__
    h.update(f"flash_kda {__version__}\n".encode())
    for name, body in template_sources().items():
        h.update(name.encode() + b"\0" + body.encode() + b"\0")
    for dist in ("nvidia-cutlass", "nvidia-cuda-cccl", "nvidia-cuda-runtime"):
        try:
            h.update(f"{dist} {metadata.version(dist)}\n".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist} absent\n".encode())
    return h.hexdigest()


def cache_key(spec: KernelSpec, compiler_identity: str) -> str:
    h = hashlib.sha256()
    h.update(_environment_fingerprint().encode())
    h.update(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(compiler_identity.encode())
    h.update(spec.source().encode())
    return h.hexdigest()[:32]


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class KernelCache:
    """Cubins by (spec, key). Reads from ``directory``; writes there or, when it is
    read-only, to a private per-user directory (with a warning)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self._write_dir: Path | None = None

    @property
    def write_dir(self) -> Path:
        if self._write_dir is None:
            if _writable(self.directory):
                self._write_dir = self.directory
            else:
                fallback = _private_fallback_dir()
                log.warning("flash_kda: cache directory %s is not writable; compiling into %s instead",
                            self.directory, fallback)
                fallback.mkdir(parents=True, exist_ok=True)
                self._write_dir = fallback
        return self._write_dir

    def entry_path(self, spec: KernelSpec, key: str, root: Path | None = None) -> Path:
        return (root or self.directory) / spec.name / f"{key}.cubin"

    def _read(self, cubin_path: Path) -> bytes | None:
        """The entry's bytes if it is complete and intact; None if absent; rebuild-worthy damage logs a warning."""
        meta_path = cubin_path.with_suffix(".json")
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            data = cubin_path.read_bytes()
        except (OSError, ValueError) as exc:
            log.warning("flash_kda: cache entry %s is unreadable (%s); rebuilding", cubin_path, exc)
            return None
        if len(data) != meta.get("size") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            log.warning("flash_kda: cache entry %s is corrupt (checksum mismatch); rebuilding", cubin_path)
            return None
        return data

    def lookup(self, spec: KernelSpec, key: str) -> tuple[bytes, Path] | None:
        """The intact entry from the cache directory, or from the private fallback when in use."""
        for root in dict.fromkeys((self.directory, self.write_dir)):
            path = self.entry_path(spec, key, root)
            data = self._read(path)
            if data is not None:
                return data, path
        return None

    def get_or_build(self, spec: KernelSpec, key: str, build: Callable[[], bytes], *,
                     allow_build: bool = True, identity: str = "") -> tuple[bytes, Path, bool]:
        """Return (cubin, path, built). Compiles at most once across processes per entry."""
        found = self.lookup(spec, key)
        if found is not None:
            return found[0], found[1], False
        if not allow_build:
            raise CacheMissError(
                f"flash_kda: FLASH_KDA_DISABLE_JIT=1 and {spec.name} (key {key}) is not in the cache "
                f"{self.directory}. Bake it ahead of time: python -m flash_kda precompile --arch {spec.arch} "
                f"--cache-dir {self.directory}")
        path = self.entry_path(spec, key, self.write_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix(".lock"))):
            data = self._read(path)  # another process may have published it while we waited
            if data is not None:
                return data, path, False
            data = build()
            meta = {"spec": asdict(spec), "key": key, "compiler": identity, "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
            _atomic_write(path, data)
            _atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
            return data, path, True

    def entries(self) -> list[Path]:
        return sorted(self.directory.glob("*/*.cubin")) if self.directory.is_dir() else []

    def clear(self) -> int:
        import shutil
        removed = 0
        if self.directory.is_dir():
            for child in self.directory.iterdir():
                if child.is_dir() and child.name.startswith("kda_"):
                    removed += len(list(child.glob("*.cubin")))
                    shutil.rmtree(child)
        return removed
