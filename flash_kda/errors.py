"""The errors flash_kda raises for things an operator must fix (as opposed to bad arguments,
which are ``ValueError``/``TypeError`` naming the argument).

Each carries its context (the specialisation, the compiler log, the cache path) and survives
pickling, so a failure inside a ``precompile`` worker process reaches the parent intact.
The command line prints ``str(error)`` of these as one line (``one_line``) instead of a traceback.
"""
from __future__ import annotations


class FlashKDAError(RuntimeError):
    """Base class of the operator-facing errors."""

    def __reduce__(self):  # rebuild from the message alone: subclasses take other constructor arguments
        return _rebuild, (type(self), str(self), self.__dict__)

    def one_line(self) -> str:
        return str(self).splitlines()[0] if str(self) else type(self).__name__


def _rebuild(cls, message: str, state: dict):
    error = cls.__new__(cls)
    RuntimeError.__init__(error, message)
    error.__dict__.update(state)
    return error


class CompileError(FlashKDAError):
    """A kernel failed to compile; carries the compiler log and the cache entry path."""

    def __init__(self, spec_name: str, compiler: str, compile_log: str, entry: str | None = None):
        self.spec_name, self.compiler, self.log, self.entry = spec_name, compiler, compile_log, entry
        where = f" (cache entry {entry})" if entry else ""
        super().__init__(f"flash_kda: {compiler} failed to compile {spec_name}{where}:\n{compile_log}")

    def first_errors(self, lines: int = 5) -> list[str]:
        """The first lines of the log that report an error (or its first lines when none says so)."""
        log_lines = [line for line in self.log.splitlines() if line.strip()]
        errors = [line for line in log_lines if "error" in line.lower()]
        return (errors or log_lines)[:lines]

    def one_line(self) -> str:
        first = self.first_errors(1)
        return (f"flash_kda: {self.compiler} failed to compile {self.spec_name}: "
                f"{first[0].strip() if first else 'no compiler output'}")


class CacheMissError(FlashKDAError):
    """FLASH_KDA_DISABLE_JIT=1 and the kernel is not in the cache."""


class CacheWriteError(FlashKDAError):
    """A cache directory or entry could not be written (read-only, disk full, not trusted)."""


class CompilerUnavailableError(FlashKDAError):
    """The selected compiler cannot be found or loaded."""
