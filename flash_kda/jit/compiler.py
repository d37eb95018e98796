"""Compile one kernel specialisation to a cubin: NVRTC (default) or nvcc.

A compiler is identified by ``identity()`` (name, version, flags); that string enters
the cache key, so a different compiler or flag never reuses a stale binary.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .headers import include_dirs
from .spec import KernelSpec, template_sources

log = logging.getLogger("flash_kda.jit")

COMMON_FLAGS = ("-std=c++17", "-DNDEBUG")


class CompileError(RuntimeError):
    """A kernel failed to compile; carries the compiler log and the cache entry path."""

    def __init__(self, spec: KernelSpec, compiler: str, compile_log: str, entry: str | None = None):
        self.spec, self.compiler, self.log, self.entry = spec, compiler, compile_log, entry
        where = f" (cache entry {entry})" if entry else ""
        super().__init__(f"flash_kda: {compiler} failed to compile {spec.name}{where}:\n{compile_log}")


class Compiler:
    name = "base"

    def version(self) -> tuple[int, int]:
        raise NotImplementedError

    toolkit_headers = True  # whether the pip CUDA headers are passed (NVRTC) or the compiler's own are used

    def flags(self, spec: KernelSpec) -> list[str]:
        return [*COMMON_FLAGS, *(f"-I{d}" for d in include_dirs(self.toolkit_headers))]

    def identity(self, spec: KernelSpec) -> str:
        major, minor = self.version()
        # include paths are not part of the identity (the header bytes are hashed instead)
        flags = [f for f in self.flags(spec) if not f.startswith("-I")]
        return f"{self.name}-{major}.{minor} {' '.join(flags)}"

    def compile(self, spec: KernelSpec) -> bytes:
        raise NotImplementedError


class NVRTCCompiler(Compiler):
    """In-process compilation with libnvrtc through cuda-python: no CUDA toolkit needed."""

    name = "nvrtc"

    def version(self) -> tuple[int, int]:
        from cuda.bindings import nvrtc
        err, major, minor = nvrtc.nvrtcVersion()
        _check_nvrtc(err, "nvrtcVersion")
        return int(major), int(minor)

    def flags(self, spec: KernelSpec) -> list[str]:
        return [f"--gpu-architecture={spec.arch}", "-default-device", *super().flags(spec)]

    def compile(self, spec: KernelSpec) -> bytes:
        from cuda.bindings import nvrtc
        headers = template_sources()
        names = [n.encode() for n in headers]
        bodies = [b.encode() for b in headers.values()]
        err, prog = nvrtc.nvrtcCreateProgram(spec.source().encode(), f"{spec.name}.cu".encode(),
                                             len(names), bodies, names)
        _check_nvrtc(err, "nvrtcCreateProgram")
        try:
            opts = [f.encode() for f in self.flags(spec)]
            (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
            if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                raise CompileError(spec, self.name, _program_log(prog))
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            _check_nvrtc(err, "nvrtcGetCUBINSize")
            cubin = b" " * size
            (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
            _check_nvrtc(err, "nvrtcGetCUBIN")
            return cubin
        finally:
            nvrtc.nvrtcDestroyProgram(prog)


class NVCCCompiler(Compiler):
    """Opt-in (FLASH_KDA_COMPILER=nvcc): the CUDA toolkit's nvcc as a subprocess."""

    name = "nvcc"
    toolkit_headers = False

    def _nvcc(self) -> str:
        home = os.environ.get("CUDA_HOME")
        candidate = Path(home, "bin", "nvcc") if home else None
        if candidate is not None and candidate.is_file():
            return str(candidate)
        found = shutil.which("nvcc")
        if found is None:
            raise RuntimeError("flash_kda: FLASH_KDA_COMPILER=nvcc but nvcc is not on PATH and CUDA_HOME is unset")
        return found

    def version(self) -> tuple[int, int]:
        out = subprocess.run([self._nvcc(), "--version"], capture_output=True, text=True, check=True).stdout
        release = out.split("release ")[1].split(",")[0]
        major, minor = release.split(".")[:2]
        return int(major), int(minor)

    def flags(self, spec: KernelSpec) -> list[str]:
        compute = spec.arch.replace("sm_", "compute_")
        return [f"-gencode=arch={compute},code={spec.arch}", *super().flags(spec)]

    def compile(self, spec: KernelSpec) -> bytes:
        with tempfile.TemporaryDirectory(prefix="flash_kda_nvcc_") as tmp:
            for name, body in template_sources().items():
                Path(tmp, name).write_text(body)
            src, out = Path(tmp, f"{spec.name}.cu"), Path(tmp, "kernel.cubin")
            src.write_text(spec.source())
            cmd = [self._nvcc(), "-cubin", *self.flags(spec), f"-I{tmp}", str(src), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CompileError(spec, self.name, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
            return out.read_bytes()


def _check_nvrtc(err, what: str) -> None:
    from cuda.bindings import nvrtc
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise RuntimeError(f"flash_kda: {what} failed: {msg.decode() if isinstance(msg, bytes) else msg}")


def _program_log(prog) -> str:
    from cuda.bindings import nvrtc
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace").rstrip("\x00 \n")


_COMPILERS = {"nvrtc": NVRTCCompiler, "nvcc": NVCCCompiler}


def get_compiler(name: str | None = None) -> Compiler:
    """The compiler named by ``name`` or ``FLASH_KDA_COMPILER`` (default NVRTC)."""
    choice = (name or os.environ.get("FLASH_KDA_COMPILER") or "nvrtc").lower()
    if choice not in _COMPILERS:
        raise ValueError(f"FLASH_KDA_COMPILER must be one of {sorted(_COMPILERS)}, got {choice!r}")
    return _COMPILERS[choice]()
