"""The FLASH_KDA_* on/off switches, read one way everywhere."""
from __future__ import annotations

import os


def env_flag(name: str) -> bool:
    """A FLASH_KDA_* switch: off when unset, empty, 0, false, no or off (any case); on otherwise."""
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")
