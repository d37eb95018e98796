"""The ``flash_kda`` logger: FLASH_KDA_LOG_LEVEL, and operator warnings that reach stderr once.

The library adds no NullHandler: when the application has configured no logging at all, Python's
last-resort handler prints WARNING and above to stderr, so an operator sees a cache fallback or an
untrusted cache directory without setting anything. An application that configures logging gets
them through its own handlers instead.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

LOGGER_NAME = "flash_kda"
LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

log = logging.getLogger(LOGGER_NAME)
_warned: set = set()
_warned_lock = threading.Lock()


def parse_level(value: str) -> int | None:
    """A logging level from a name (any case) or a number; None when it is neither."""
    value = value.strip()
    if value.upper() in LEVEL_NAMES:
        return getattr(logging, value.upper())
    try:
        return int(value)
    except ValueError:
        return None


def configure_from_env() -> None:
    """Apply FLASH_KDA_LOG_LEVEL (a stderr handler at that level). A bad value warns and falls back
    to WARNING: a typo in an environment variable must not break ``import flash_kda``."""
    value = os.environ.get("FLASH_KDA_LOG_LEVEL", "")
    if not value.strip():
        return
    level = parse_level(value)
    if level is None:
        sys.stderr.write(f"flash_kda: FLASH_KDA_LOG_LEVEL={value!r} is not a log level (use one of "
                         f"{', '.join(LEVEL_NAMES)} or a number); using WARNING\n")
        level = logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(name)s %(levelname)s] %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)


def operator_warning(message: str, key: object = None) -> None:
    """A warning that matters to whoever runs the process (a cache fallback, an untrusted or corrupt
    entry): logged once per process for each ``key`` (default: the message)."""
    key = message if key is None else key
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)
