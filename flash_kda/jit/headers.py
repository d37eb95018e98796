"""Find the CUDA/CUTLASS/CCCL headers the templates include.

pip installs the NVIDIA header wheels under the namespace package ``nvidia`` (which may
span several site-packages directories, e.g. a system one and a ``--target`` one) and
CUTLASS under ``cutlass_library/source/include``. ``CUDA_HOME`` is the fallback.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from pathlib import Path


class HeaderNotFoundError(RuntimeError):
    pass


def _namespace_roots() -> list[Path]:
    roots: list[Path] = []
    try:
        import nvidia  # namespace package: one entry per site-packages holding it
        roots += [Path(p) for p in nvidia.__path__]
    except ImportError:
        pass
    for entry in sys.path:  # a namespace package imported before sys.path grew may miss entries
        candidate = Path(entry or ".") / "nvidia"
        if candidate.is_dir() and candidate not in roots:
            roots.append(candidate)
    return roots


def _cuda_home() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    default = Path("/usr/local/cuda")
    return default if default.is_dir() else None


def _first_with(candidates: list[Path], marker: str) -> Path | None:
    for path in candidates:
        if (path / marker).is_file():
            return path
    return None


@functools.lru_cache(maxsize=None)
def include_dirs(toolkit_headers: bool = True) -> tuple[str, ...]:
    """Include directories, in search order: CUTLASS, CCCL, CUDA runtime headers.

    ``toolkit_headers=False`` (nvcc) leaves the CUDA headers to the compiler's own toolkit, whose
    version must match it; NVRTC has no toolkit and takes the pip-installed ones."""
    roots = _namespace_roots()
    home = _cuda_home()

    cutlass_candidates = []
    try:
        import cutlass_library
        cutlass_candidates.append(Path(cutlass_library.__file__).parent / "source" / "include")
    except ImportError:
        pass
    if os.environ.get("CUTLASS_PATH"):
        cutlass_candidates.append(Path(os.environ["CUTLASS_PATH"]) / "include")
    cutlass = _first_with(cutlass_candidates, "cute/arch/mma_sm80.hpp")

    cccl_candidates = []
    for root in roots:
        cccl_candidates += [root / "cu13" / "include" / "cccl", root / "cuda_cccl" / "include",
                            root / "cu12" / "include" / "cccl"]
    if home is not None:
        cccl_candidates += [home / "include" / "cccl", home / "include"]
    cccl = _first_with(cccl_candidates, "cuda/std/cstdint")

    runtime_candidates = []
    for root in roots:
        runtime_candidates += [root / "cu13" / "include", root / "cuda_runtime" / "include",
                               root / "cu12" / "include"]
    if home is not None:
        runtime_candidates.append(home / "include")
    runtime = _first_with(runtime_candidates, "cuda_bf16.h")

    missing = [name for name, path, pkg in (("CUTLASS/CuTe", cutlass, "nvidia-cutlass"),
                                            ("CCCL (libcu++)", cccl, "nvidia-cuda-cccl"),
                                            ("CUDA runtime", runtime, "nvidia-cuda-runtime"))
               if path is None]
    if missing:
        raise HeaderNotFoundError(
            f"flash_kda: cannot find the {', '.join(missing)} headers. Install the pinned wheels "
            f"(pip install 'flash-kda' pulls nvidia-cutlass, nvidia-cuda-cccl, nvidia-cuda-runtime) or set "
            f"CUDA_HOME / CUTLASS_PATH. Searched nvidia namespace roots {[str(r) for r in roots]} and CUDA_HOME={home}.")
    dirs = [cutlass, cccl]
    if toolkit_headers:
        if cccl.name == "cccl":  # some CUTLASS/NVRTC pairs include CCCL as <cccl/cuda/std/...>
            dirs.append(cccl.parent)
        dirs.append(runtime)
    return tuple(dict.fromkeys(str(p) for p in dirs))


# every #include, also in comments and inactive branches: a superset of what a compile reads
_INCLUDE = re.compile(rb'#[ \t]*include[ \t]*[<"]([^">\n]+)[">]')


@functools.lru_cache(maxsize=None)
def header_digest(toolkit_headers: bool = True) -> str:
    """SHA-256 over the bytes of every header the templates can reach through ``include_dirs``.

    Follows every ``#include`` (in every preprocessor branch, so a superset of what one compile
    reads) from the templates, resolving like the compiler: the including file's directory for
    quoted names, then the include directories in order. Names found in none of them (the
    compiler's built-ins, e.g. <cstdint> under NVRTC) enter by name. About 100 files, tens of
    milliseconds; computed once per process, on the first cache lookup, never per call."""
    from .spec import template_sources
    dirs = include_dirs(toolkit_headers)
    digest = hashlib.sha256()
    seen: set[str] = set()
    unresolved: set[str] = set()
    pending = [("", m.decode()) for body in template_sources().values() for m in _INCLUDE.findall(body.encode())]
    while pending:
        base, name = pending.pop()
        for directory in ((base,) if base else ()) + dirs:
            path = os.path.normpath(os.path.join(directory, name))
            if os.path.isfile(path):
                if path not in seen:
                    seen.add(path)
                    with open(path, "rb") as f:
                        data = f.read()
                    parent = os.path.dirname(path)
                    pending += [(parent, m.decode()) for m in _INCLUDE.findall(data)]
                    digest.update(f"{name}\0{len(data)}\0".encode() + hashlib.sha256(data).digest())
                break
        else:
            unresolved.add(name)
    digest.update("\0".join(sorted(unresolved)).encode())
    return digest.hexdigest()
