"""On-disk kernel cache: content-addressed entries, a file lock per entry, atomic publish.

Layout: ``<cache_dir>/<spec name>/<key>.cubin`` plus ``<key>.json`` (the spec, the key, the
compiler and the cubin's SHA-256). The JSON is published last by atomic rename, so an entry is
visible only when complete. Before a cubin is returned it must pass, in order:

* trust (``trust.py``): its directories and files are owned by this user or root and not
  writable by group or others, unless FLASH_KDA_CACHE_TRUST=any;
* identity: the JSON names the requested key and spec, and the cubin carries the spec's name
  (``spec.source()`` embeds it), so a copied or swapped entry is never served;
* integrity: size and SHA-256 match the JSON.

An entry failing identity or integrity is rebuilt with a warning; an untrusted directory is not
read at all (warning once), and compiles go to a private directory instead.

Lookups have no side effects (no directory is created, nothing is written), so a hit needs no
writable directory anywhere. Published files get mode 0644 and new directories 0755 (minus the
umask), so a cache baked by one user (root, in an image build) is readable by every other.
Locks are OS-level (``filelock``, flock on POSIX): a killed holder releases its lock.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from filelock import FileLock

from ..errors import CacheMissError, CacheWriteError
from ..logs import operator_warning
from . import trust
from .spec import AnySpec, spec_from_dict, template_sources

__all__ = ["CacheMissError", "CacheWriteError", "KernelCache", "cache_key", "default_cache_dir", "EntryCheck",
           "check_entry"]

ENTRY_PREFIX = "kda_"  # every spec name starts with it; clear() removes only such directories


def default_cache_dir() -> Path:
    if os.environ.get("FLASH_KDA_CACHE_DIR"):
        return Path(os.environ["FLASH_KDA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flash_kda"


@functools.lru_cache(maxsize=None)
def _environment_fingerprint() -> str:
    """Bytes that change the binary but are not in the spec or the compiler identity: the package
    version, the template files and the versions of the header wheels."""
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


def cache_key(spec: AnySpec, compiler_identity: str, headers: str = "") -> str:
    """The entry name: a hash of everything that changes the binary. ``compiler_identity`` is the
    compiler's name, version and flags; ``headers`` the digest of the header bytes it reads
    (``Compiler.header_digest``)."""
    h = hashlib.sha256()
    h.update(_environment_fingerprint().encode())
    h.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    h.update(compiler_identity.encode())
    h.update(headers.encode())
    h.update(spec.source().encode())
    return h.hexdigest()[:32]


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    """This process's umask, read without changing it where /proc allows (os.umask can only set)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o644 & ~_umask()  # readable per the umask, never writable beyond the owner (trust rule)


def _dir_mode() -> int:
    return 0o755 & ~_umask()


def _make_dirs(path: Path) -> None:
    """mkdir -p, giving each directory it creates the cache's directory mode (not the umask's,
    which may leave it group-writable and so untrusted)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
            os.chmod(directory, _dir_mode())
        except FileExistsError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write elsewhere in the same directory, then rename over ``path`` (readers never see a torn file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), _file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _write_problem(directory: Path) -> str | None:
    """Why new entries cannot be published in ``directory`` (None when they can); creates it if missing."""
    try:
        _make_dirs(directory)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as exc:
        return f"{exc.strerror or exc} ({exc.filename or directory})"
    return None


@dataclass(frozen=True)
class EntryCheck:
    """What ``check_entry`` found: the cubin when it may be loaded, else why not."""

    data: bytes | None
    problem: str | None = None


def check_entry(cubin_path: Path, spec: AnySpec, key: str) -> EntryCheck:
    """Identity and integrity of one entry (trust is checked by the caller, per directory).

    Missing entry: ``EntryCheck(None)``; a damaged or foreign one: ``EntryCheck(None, why)``."""
    meta_path = cubin_path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        data = cubin_path.read_bytes()
    except FileNotFoundError:
        return EntryCheck(None, None if not meta_path.exists() else f"{cubin_path} is missing")
    except (OSError, ValueError) as exc:
        return EntryCheck(None, f"unreadable ({exc})")
    if not isinstance(meta, dict):
        return EntryCheck(None, "unreadable (its metadata is not a JSON object)")
    if meta.get("key") != key or meta.get("spec") != spec.to_dict():
        claimed = meta.get("spec")
        label = f" and spec {_spec_label(claimed)}" if isinstance(claimed, dict) else ""
        return EntryCheck(None, f"holds another kernel: its metadata names key {meta.get('key')!r}{label}, "
                                f"expected {key} ({spec.name})")
    if len(data) != meta.get("size") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return EntryCheck(None, "corrupt (size or checksum mismatch)")
    if spec.identity_tag() not in data:
        return EntryCheck(None, f"holds another kernel: the cubin does not carry the name {spec.name}")
    return EntryCheck(data)


def _spec_label(spec_dict: dict) -> str:
    try:
        return spec_from_dict(spec_dict).name
    except (TypeError, ValueError):
        return repr(spec_dict)


class KernelCache:
    """Cubins by (spec, key). Reads from ``directory`` (when trusted); publishes there, or, when it is
    not writable or not trusted and ``fallback`` is on, into a private per-user directory (with a
    warning). ``fallback=False`` (baking an image) turns that case into a ``CacheWriteError``."""

    def __init__(self, directory: str | os.PathLike | None = None, *, fallback: bool = True):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.fallback = fallback
        self.trust_any = trust.trust_everything()
        self._write_dir: Path | None = None
        self._private: Path | None = None  # the private fallback, once chosen

    # ------------------------------------------------------------------ trust

    def _private_candidate(self) -> Path | None:
        """The private fallback in use, else the predictable one (None when no temp directory exists)."""
        if self._private is not None:
            return self._private
        try:
            return trust.default_private_dir()
        except OSError:  # no usable temporary directory (read-only root): no fallback to read either
            return None

    def untrusted_reason(self, root: Path, entry: Path | None = None) -> str | None:
        if root != self.directory and root == self._private_candidate():
            problem = trust.private_problem(root)  # checked whatever FLASH_KDA_CACHE_TRUST says
            if problem:
                return problem
        if self.trust_any:
            return None
        files = () if entry is None else (entry, entry.with_suffix(".json"))
        return trust.untrusted_reason(root, files)

    def _warn_untrusted(self, root: Path, problem: str) -> None:
        operator_warning(f"flash_kda: not loading kernels from {root}: {problem}; {trust.RULE}.",
                         key=("untrusted", str(root)))

    # ------------------------------------------------------------------ reading

    def _read_roots(self):
        """Where entries may be found: the cache directory, then the private fallback (in use, or left
        by an earlier process; never created here). A generator: a hit in the first needs nothing else."""
        yield self.directory
        private = self._private_candidate()
        if private is not None and private != self.directory and private.is_dir():
            yield private

    def entry_path(self, spec: AnySpec, key: str, root: Path | None = None) -> Path:
        return (root or self.directory) / spec.name / f"{key}.cubin"

    def _load(self, root: Path, path: Path, spec: AnySpec, key: str) -> bytes | None:
        """The entry at ``path`` when it is trusted and intact; None when absent or refused (with a warning)."""
        if not path.with_suffix(".json").exists():
            return None
        problem = self.untrusted_reason(root, path)
        if problem is not None:
            self._warn_untrusted(root, problem)
            return None
        found = check_entry(path, spec, key)
        if found.problem is not None:
            operator_warning(f"flash_kda: cache entry {path}: {found.problem}; rebuilding it",
                             key=("damaged", str(path), found.problem))
        return found.data

    def lookup(self, spec: AnySpec, key: str) -> tuple[bytes, Path] | None:
        """The trusted, intact entry for (spec, key), or None. Creates and writes nothing."""
        for root in self._read_roots():
            path = self.entry_path(spec, key, root)
            data = self._load(root, path, spec, key)
            if data is not None:
                return data, path
        return None

    # ------------------------------------------------------------------ writing

    @property
    def write_dir(self) -> Path:
        """Where new entries are published (chosen on the first miss; the private one re-checked on every use)."""
        if self._write_dir is not None and self._write_dir == self._private:
            if trust.private_problem(self._private) is not None or not self._private.is_dir():
                self._write_dir = self._private = None  # loosened or removed since: choose again
        if self._write_dir is None:
            untrusted = None if self.trust_any else trust.untrusted_reason(self.directory)
            problem = untrusted or _write_problem(self.directory)
            self._write_dir = self.directory if problem is None else self._go_private(self.directory, problem,
                                                                                     untrusted is not None)
        return self._write_dir

    def _go_private(self, refused: Path, problem: str, untrusted: bool) -> Path:
        """Publish into the private fallback from now on, because ``refused`` cannot be used (warning once);
        a CacheWriteError instead when there must be no fallback or none can be made."""
        why = f"{problem}; {trust.RULE}" if untrusted else problem
        if not self.fallback:
            raise CacheWriteError(f"flash_kda: cannot write the cache directory {refused}: {why}")
        try:
            self._private = trust.make_private_dir()
        except OSError as exc:
            raise CacheWriteError(
                f"flash_kda: the cache directory {refused} cannot be used for new kernels ({problem}) and no private "
                f"temporary directory can be made ({exc.strerror or exc}); set FLASH_KDA_CACHE_DIR to a writable "
                "directory, or bake every kernel ahead of time (python -m flash_kda precompile)") from exc
        if untrusted:
            operator_warning(f"flash_kda: not using the cache directory {refused}: {why}. Compiling into "
                             f"{self._private} instead.", key=("untrusted for writing", str(refused)))
        else:
            operator_warning(f"flash_kda: cannot write the cache directory {refused} ({problem}); compiling into "
                             f"{self._private} instead", key=("fallback", str(refused)))
        return self._private

    def get_or_build(self, spec: AnySpec, key: str, build: Callable[[], bytes], *,
                     allow_build: bool = True, identity: str = "",
                     miss_hint: str = "") -> tuple[bytes, Path, bool]:
        """Return (cubin, path, built). Compiles at most once across processes per entry."""
        found = self.lookup(spec, key)
        if found is not None:
            return found[0], found[1], False
        if not allow_build:
            raise CacheMissError(
                f"flash_kda: FLASH_KDA_DISABLE_JIT=1 and {spec.name} (key {key}) is not in the cache {self.directory}"
                f" (the key covers the spec, the compiler and its version, the headers and flash_kda's version). "
                f"Bake it ahead of time with the compiler this process uses: python -m flash_kda precompile "
                f"--arch {spec.arch} --cache-dir {self.directory}{miss_hint}")
        data: bytes | None = None
        for attempt in range(4):  # a concurrent clear-cache may remove the entry's directory under us
            root = self.write_dir
            path = self.entry_path(spec, key, root)
            problem = self.untrusted_reason(root, path)  # the entry's own directory and files, if any
            if problem is not None:
                if root == self._private:
                    raise CacheWriteError(f"flash_kda: cannot publish {path}: {problem}")
                self._write_dir = self._go_private(root, problem, untrusted=True)
                continue
            try:
                _make_dirs(path.parent)
                lock_path = path.with_suffix(".lock")
                if lock_path.is_symlink():
                    raise CacheWriteError(f"flash_kda: refusing the lock file {lock_path}: it is a symbolic link "
                                          "(planted by someone with write access to the cache?)")
                with FileLock(str(lock_path)):
                    found_data = self._load(root, path, spec, key)  # another process may have published it
                    if found_data is not None:
                        return found_data, path, False
                    if data is None:
                        data = build()
                    meta = {"spec": spec.to_dict(), "key": key, "compiler": identity, "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()}
                    _atomic_write(path, data)
                    _atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
                    return data, path, True
            except FileNotFoundError:
                continue
            except FileExistsError as exc:
                # mkdir(exist_ok=True) (filelock's, for the lock's directory) raises this when the directory it
                # found is removed before it checks it: a concurrent clear-cache, so try again; but not for a
                # name that something other than a directory holds
                if not (exc.filename and os.path.lexists(exc.filename) and not os.path.isdir(exc.filename)):
                    continue
                raise CacheWriteError(f"flash_kda: cannot write {exc.filename}: it exists and is not a directory"
                                      ) from exc
            except CacheWriteError:
                raise
            except OSError as exc:
                raise CacheWriteError(f"flash_kda: cannot write {exc.filename or path}: {exc.strerror or exc}"
                                      f"{f' [errno {exc.errno}]' if exc.errno else ''}") from exc
        raise CacheWriteError(f"flash_kda: cannot publish {spec.name} in {self.write_dir}: its directory keeps "
                              "disappearing (a concurrent clear-cache?)")

    # ------------------------------------------------------------------ listing and removal

    def entries(self) -> list[Path]:
        return sorted(self.directory.glob(f"{ENTRY_PREFIX}*/*.cubin")) if self.directory.is_dir() else []

    def clear(self) -> int:
        """Remove every entry directory; tolerates a precompile publishing at the same time."""
        removed = 0
        if not self.directory.is_dir():
            return 0
        for child in list(self.directory.iterdir()):
            if not (child.is_dir() and not child.is_symlink() and child.name.startswith(ENTRY_PREFIX)):
                continue
            removed += len(list(child.glob("*.cubin")))
            for _ in range(5):  # files published while we delete make rmtree fail: try again
                try:
                    shutil.rmtree(child)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    continue
        return removed
