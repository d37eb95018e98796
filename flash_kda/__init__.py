"""flash_kda: JIT-compiled CUDA forward kernels for Kimi Delta Attention (KDA)."""
from __future__ import annotations

import logging
import os

__version__ = "0.1.0"

_log = logging.getLogger("flash_kda")
_log.addHandler(logging.NullHandler())
if os.environ.get("FLASH_KDA_LOG_LEVEL"):
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[%(name)s %(levelname)s] %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(os.environ["FLASH_KDA_LOG_LEVEL"].upper())

from .api import fwd, kda, workspace_size  # noqa: E402
from .precompile import precompile  # noqa: E402
from . import torch_ops  # noqa: E402,F401  (registers torch.ops.flash_kda.fwd)

__all__ = ["fwd", "kda", "workspace_size", "precompile", "__version__"]
