"""The config error every section raises, and its one-line check. Kept apart from `training.config` so section
dataclasses (imported by it) can use them without an import cycle."""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value} is not allowed: must be {allowed}")
