"""The FLASH_KDA_* on/off switches, read one way everywhere."""
from __future__ import annotations

import os


def env_flag(name: str, default: bool = False) -> bool:
    """A FLASH_KDA_* switch: ``default`` when unset or empty; off when 0, false, no or off (any case);
    on otherwise."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "no", "off")
