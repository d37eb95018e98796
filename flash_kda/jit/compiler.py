"""Compile one kernel specialisation to a cubin: NVRTC (default) or nvcc.

A compiler is identified by ``identity()`` (name, version, flags without include paths) and
``header_digest()`` (the bytes of the headers it reads from those paths); both enter the cache
key, so a different compiler, flag or edited header never reuses a stale binary.

Debugging switches, read at each compile (DeepGEMM's DG_JIT_* in spirit):

- ``FLASH_KDA_JIT_CHECK_SPILLS=1``: ptxas reports registers and spills (logged at DEBUG), and a
  kernel that spills to local memory (any byte, on any target) fails to compile with that report.
  CI compiles every specialisation for every target this way. NVRTC 13 keeps its cubins in the CUDA
  compute cache (``~/.nv/ComputeCache``) and returns no report for one it takes from there: a compile
  without a report fails too, and precompile's workers run with ``CUDA_CACHE_DISABLE=1`` when the
  check is on.
- ``FLASH_KDA_JIT_DUMP=<dir>``: each compile writes ``<dir>/<spec name>/``: the generated source,
  the PTX, the ptxas report, and the SASS when cuobjdump or nvdisasm is found.
- ``FLASH_KDA_JIT_LINEINFO=1``: ``-lineinfo`` for profilers. It changes the binary, so it is a flag
  of the identity and enters the key; the other two do not change the cubin.
- ``FLASH_KDA_JIT_PCH``: NVRTC's precompiled headers. The CuTe headers and the templates are parsed
  once per process, target and template (more than half of a compile: 4.4 → 2.1 s a chunked
  specialisation on 2 cores) and the result is kept in a private temporary directory; building it
  costs about 1.5 s once. On by default in precompile's worker processes, which compile many; off
  for the JIT's compile of a first call, where it would only add that 1.5 s. The cubins are
  byte-identical either way.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import CompileError, CompilerUnavailableError
from .arch import virtual_target
from .env import env_flag
from .headers import header_digest, include_dirs
from .spec import KernelSpec, template_sources

log = logging.getLogger("flash_kda.jit")

COMMON_FLAGS = ("-std=c++17", "-DNDEBUG")
NVRTC_PACKAGE = "nvidia-cuda-nvrtc"
NVCC_DIRS = ("/usr/local/cuda/bin",)  # searched after $CUDA_HOME/bin and PATH
# NVRTC's heap for building a precompiled header: ~270 MB for the templates (NVRTC 13.0 warns and
# goes without one when it is too small).
PCH_HEAP_BYTES = 512 * 2**20


class Compiler:
    name = "base"

    def __init__(self, selected_by: str = "") -> None:
        self.selected_by = selected_by  # how the user chose it (for messages), e.g. "FLASH_KDA_COMPILER=nvcc"

    def version(self) -> tuple[int, int]:
        raise NotImplementedError

    toolkit_headers = True  # whether the pip CUDA headers are passed (NVRTC) or the compiler's own are used

    def flags(self, spec: KernelSpec) -> list[str]:
        lineinfo = ["-lineinfo"] if env_flag("FLASH_KDA_JIT_LINEINFO") else []
        return [*COMMON_FLAGS, *lineinfo, *(f"-I{d}" for d in include_dirs(self.toolkit_headers))]

    def identity(self, spec: KernelSpec) -> str:
        major, minor = self.version()
        # include paths are left out: where the headers live does not change the binary, their bytes
        # do, and those enter the key through header_digest()
        flags = [f for f in self.flags(spec) if not f.startswith("-I")]
        return f"{self.name}-{major}.{minor} {' '.join(flags)}"

    def header_digest(self) -> str:
        return header_digest(self.toolkit_headers)

    def compile(self, spec: KernelSpec) -> bytes:
        """The cubin for ``spec``, with the debugging switches of the module docstring applied."""
        check_spills = env_flag("FLASH_KDA_JIT_CHECK_SPILLS")
        dump = os.environ.get("FLASH_KDA_JIT_DUMP", "").strip()
        cubin, report = self._compile(spec, ptx=False, verbose=check_spills or bool(dump))
        if report:
            log.debug("flash_kda: ptxas on %s:\n%s", spec.name, report)
        if dump:
            _dump(Path(dump) / spec.name, spec, cubin, report, self._compile(spec, ptx=True, verbose=False)[0])
        if check_spills:
            spilled = [int(n) for n in _SPILLS.findall(report)]
            if not spilled:  # e.g. NVRTC 13 took the cubin from the CUDA compute cache, which keeps no report
                raise CompileError(spec.name, self.name,
                                   f"FLASH_KDA_JIT_CHECK_SPILLS=1: no ptxas report to check in the log of "
                                   f"{self.identity(spec)} ({len(report)} characters). NVRTC returns none for "
                                   f"a cubin it takes from the CUDA compute cache (CUDA_CACHE_PATH, by default "
                                   f"~/.nv/ComputeCache): run with CUDA_CACHE_DISABLE=1 (precompile's workers "
                                   f"do when the check is on).\n{report}")
            if max(spilled) > 0:
                raise CompileError(spec.name, self.name,
                                   f"FLASH_KDA_JIT_CHECK_SPILLS=1: the kernel spills {max(spilled)} bytes to local memory "
                                   f"on {spec.arch}\n{report}")
        return cubin

    def _compile(self, spec: KernelSpec, *, ptx: bool, verbose: bool) -> tuple[bytes, str]:
        """(cubin, or PTX when ``ptx``; the ptxas report when ``verbose``, else "")."""
        raise NotImplementedError


_SPILLS = re.compile(r"(\d+) bytes spill (?:stores|loads)")


def _dump(directory: Path, spec: KernelSpec, cubin: bytes, report: str, ptx: bytes) -> None:
    """FLASH_KDA_JIT_DUMP: the source, PTX, ptxas report and (when a disassembler is found) SASS of one compile."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "source.cu").write_text(spec.source())
    (directory / "kernel.ptx").write_bytes(ptx.rstrip(b"\x00"))
    (directory / "ptxas.log").write_text(report)
    (directory / "kernel.cubin").write_bytes(cubin)
    for tool, args in (("cuobjdump", ["-sass"]), ("nvdisasm", ["-c"])):
        path = toolkit_tool(tool)
        if path:
            proc = subprocess.run([path, *args, str(directory / "kernel.cubin")], capture_output=True, text=True)
            if proc.returncode == 0:
                (directory / "kernel.sass").write_text(proc.stdout)
                break
    else:
        log.debug("flash_kda: no cuobjdump or nvdisasm found; %s has no SASS", directory)
    log.warning("flash_kda: FLASH_KDA_JIT_DUMP wrote %s", directory)


class NVRTCCompiler(Compiler):
    """In-process compilation with libnvrtc through cuda-python: no CUDA toolkit needed."""

    name = "nvrtc"

    def version(self) -> tuple[int, int]:
        try:
            from cuda.bindings import nvrtc
            err, major, minor = nvrtc.nvrtcVersion()
        except Exception as exc:  # noqa: BLE001 - ImportError, or cuda.pathfinder's DynamicLibNotFoundError
            raise CompilerUnavailableError(
                f"flash_kda: cannot load NVRTC, the default compiler ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Install it with pip install '{NVRTC_PACKAGE}>=13,<14' "
                "(or use the CUDA toolkit's nvcc: FLASH_KDA_COMPILER=nvcc)") from exc
        _check_nvrtc(err, "nvrtcVersion")
        return int(major), int(minor)

    def flags(self, spec: KernelSpec) -> list[str]:
        return [f"--gpu-architecture={spec.arch}", "-default-device", *super().flags(spec)]

    def _compile(self, spec: KernelSpec, *, ptx: bool, verbose: bool) -> tuple[bytes, str]:
        from cuda.bindings import nvrtc
        headers = template_sources()
        pch = _pch_flags(headers) if env_flag("FLASH_KDA_JIT_PCH") else []
        names = [n.encode() for n in headers]
        bodies = [b.encode() for b in headers.values()]
        err, prog = nvrtc.nvrtcCreateProgram(spec.source().encode(), f"{spec.name}.cu".encode(),
                                             len(names), bodies, names)
        _check_nvrtc(err, "nvrtcCreateProgram")
        try:
            flags = self.flags(spec)
            if ptx:  # a virtual architecture: NVRTC then stops at PTX
                flags = [f"--gpu-architecture={virtual_target(spec.arch)}" if f.startswith("--gpu-") else f for f in flags]
            opts = [f.encode() for f in flags + pch + (["--ptxas-options=-v"] if verbose else [])]
            (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
            if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                raise CompileError(spec.name, self.name, _program_log(prog))
            get_size, get = (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX) if ptx else (nvrtc.nvrtcGetCUBINSize,
                                                                                      nvrtc.nvrtcGetCUBIN)
            err, size = get_size(prog)
            _check_nvrtc(err, get_size.__name__)
            image = b" " * size
            (err,) = get(prog, image)
            _check_nvrtc(err, get.__name__)
            return image, _program_log(prog) if verbose else ""
        finally:
            nvrtc.nvrtcDestroyProgram(prog)


PCH_PREFIX = "flash_kda_pch_"  # + the owning process's pid + "_" + mkdtemp's suffix
PCH_STALE_SECONDS = 3600


@functools.lru_cache(maxsize=None)
def _pch_root() -> str:
    """This process's private directory for precompiled headers (0700), made at first use and removed at
    exit; those that killed processes left behind (no atexit) are removed here."""
    from cuda.bindings import nvrtc
    _check_nvrtc(nvrtc.nvrtcSetPCHHeapSize(PCH_HEAP_BYTES)[0], "nvrtcSetPCHHeapSize")
    remove_stale_pch_dirs(tempfile.gettempdir())
    root = tempfile.mkdtemp(prefix=f"{PCH_PREFIX}{os.getpid()}_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def remove_stale_pch_dirs(parent: str) -> int:
    """Remove the PCH directories under ``parent`` that this user's processes left when killed: their
    pid is not running and they have not changed for PCH_STALE_SECONDS (a pid in another pid namespace
    sharing the directory looks dead from here: the age keeps a live one's). Returns how many."""
    removed, now = 0, time.time()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return 0
    for entry in entries:
        pid = entry.name[len(PCH_PREFIX):].split("_", 1)[0] if entry.name.startswith(PCH_PREFIX) else ""
        if not pid.isdigit():
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and now - info.st_mtime >= PCH_STALE_SECONDS
                and not _process_exists(int(pid))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
            log.debug("flash_kda: removed %s, left by process %s", entry.path, pid)
    return removed


def _process_exists(pid: int) -> bool:
    """Whether ``pid`` names a running process (when in doubt: yes, so that nothing live is removed)."""
    if pid <= 0:
        return True  # 0 would ask about our own process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; not a pid at all
        return True
    return True


def _pch_flags(headers: dict[str, str]) -> list[str]:
    """NVRTC's automatic precompiled headers, kept in a directory only this process writes (0700,
    removed at exit), one subdirectory per template text: a PCH never outlives the headers it was
    built from, and no other user can plant one. NVRTC picks, among the files there, the one whose
    include prefix and options match (one per template and target)."""
    digest = hashlib.sha256("\0".join(f"{k}\0{v}" for k, v in headers.items()).encode()).hexdigest()[:16]
    directory = os.path.join(_pch_root(), digest)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # 629/630: "this PCH file does not match" notes, printed for each file NVRTC passes over
    return ["--pch", f"--pch-dir={directory}", "--pch-messages=false", "--diag-suppress=629,630"]


class NVCCCompiler(Compiler):
    """Opt-in (FLASH_KDA_COMPILER=nvcc): the CUDA toolkit's nvcc as a subprocess."""

    name = "nvcc"
    toolkit_headers = False

    def _nvcc(self) -> str:
        """nvcc (``toolkit_tool``), or an error that says where it looked and what chose it."""
        nvcc = toolkit_tool("nvcc")
        if nvcc:
            return nvcc
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        looked = ", ".join([*([f"{home}/bin"] if home else []), "PATH", *NVCC_DIRS])
        chosen = f" (selected by {self.selected_by})" if self.selected_by else ""
        raise CompilerUnavailableError(
            f"flash_kda: nvcc not found{chosen}; looked on {looked}. Install the CUDA toolkit or set CUDA_HOME, "
            "or use the default compiler, NVRTC")

    def version(self) -> tuple[int, int]:
        return _nvcc_version(self._nvcc())

    def flags(self, spec: KernelSpec) -> list[str]:
        return [f"-gencode=arch={virtual_target(spec.arch)},code={spec.arch}", *super().flags(spec)]

    def _compile(self, spec: KernelSpec, *, ptx: bool, verbose: bool) -> tuple[bytes, str]:
        with tempfile.TemporaryDirectory(prefix="flash_kda_nvcc_") as tmp:
            for name, body in template_sources().items():
                Path(tmp, name).write_text(body)
            src, out = Path(tmp, f"{spec.name}.cu"), Path(tmp, "kernel.out")
            src.write_text(spec.source())
            flags = self.flags(spec)
            if ptx:
                flags = [f"-arch={virtual_target(spec.arch)}" if f.startswith("-gencode") else f for f in flags]
            cmd = [self._nvcc(), "-ptx" if ptx else "-cubin", *flags, *(["-Xptxas", "-v"] if verbose else []),
                   f"-I{tmp}", str(src), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CompileError(spec.name, self.name, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
            return out.read_bytes(), (proc.stdout + proc.stderr).strip() if verbose else ""


def toolkit_tool(name: str) -> str | None:
    """A CUDA toolkit program (nvcc, cuobjdump, ...) from $CUDA_HOME/bin, then PATH, then /usr/local/cuda/bin."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [str(Path(home, "bin", name))] if home else []
    candidates += [shutil.which(name), *(os.path.join(d, name) for d in NVCC_DIRS)]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> tuple[int, int]:
    proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    if proc.returncode != 0 or "release " not in proc.stdout:
        raise CompilerUnavailableError(f"flash_kda: {nvcc} --version failed: {(proc.stderr or proc.stdout).strip()}")
    major, minor = proc.stdout.split("release ")[1].split(",")[0].split(".")[:2]
    return int(major), int(minor)


def _check_nvrtc(err, what: str) -> None:
    from cuda.bindings import nvrtc
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise RuntimeError(f"flash_kda: {what} failed: {msg.decode() if isinstance(msg, bytes) else msg}")


def _program_log(prog) -> str:
    """NVRTC's log of ``prog``: the compile errors, or ptxas's report where -v was asked for. A failure
    to read it raises (an empty string would read as "ptxas reported nothing")."""
    from cuda.bindings import nvrtc
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    _check_nvrtc(err, "nvrtcGetProgramLogSize")
    buf = b" " * size
    (err,) = nvrtc.nvrtcGetProgramLog(prog, buf)
    _check_nvrtc(err, "nvrtcGetProgramLog")
    return buf.decode(errors="replace").rstrip("\x00 \n")


_COMPILERS = {"nvrtc": NVRTCCompiler, "nvcc": NVCCCompiler}


def get_compiler(name: str | None = None, *, selected_by: str | None = None) -> Compiler:
    """The compiler named by ``name`` or else ``FLASH_KDA_COMPILER`` (default NVRTC).

    ``selected_by`` says, in messages, how ``name`` was chosen (e.g. "--compiler nvcc")."""
    if name is not None:
        choice, source = name, selected_by or f"compiler={name!r}"
    elif os.environ.get("FLASH_KDA_COMPILER", "").strip():
        choice = os.environ["FLASH_KDA_COMPILER"].strip()
        source = f"FLASH_KDA_COMPILER={choice}"
    else:
        choice, source = "nvrtc", ""
    compiler_class = _COMPILERS.get(choice.lower()) if isinstance(choice, str) else None
    if compiler_class is None:
        what = source.split("=")[0] if source.startswith("FLASH_KDA_COMPILER") else "the compiler"
        raise ValueError(f"flash_kda: {what} must be one of {', '.join(_COMPILERS)}, got {choice!r}")
    return compiler_class(source)
