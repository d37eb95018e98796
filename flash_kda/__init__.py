"""flash_kda: JIT-compiled CUDA forward kernels for Kimi Delta Attention (KDA)."""
from __future__ import annotations

__version__ = "0.1.0"

from .logs import configure_from_env as _configure_logging  # noqa: E402

_configure_logging()

from .api import fwd, kda, workspace_size  # noqa: E402
from .errors import CacheMissError, CacheWriteError, CompileError, CompilerUnavailableError, FlashKDAError  # noqa: E402
from .precompile import precompile, verify  # noqa: E402
from . import torch_ops  # noqa: E402,F401  (registers torch.ops.flash_kda.fwd)

__all__ = ["fwd", "kda", "workspace_size", "precompile", "verify", "FlashKDAError", "CompileError",
           "CacheMissError", "CacheWriteError", "CompilerUnavailableError", "__version__"]
