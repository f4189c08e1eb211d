"""The limits on what an instance's data may cost this machine, each a whole number of bytes or characters that
an environment variable may change (read when a job needs it, so a test or a user lowers it without a restart).

The instance is a stranger's computer: whatever it sends is bounded (README, "What reaches a rented machine").
"""

from __future__ import annotations

import os

from .errors import ConfigError

__all__ = ["env_limit"]


def env_limit(name: str, default: int) -> int:
    """``$name`` as a positive whole number, else ``default``; anything else is one clear error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name}={raw!r}: must be a positive whole number")
    return value
