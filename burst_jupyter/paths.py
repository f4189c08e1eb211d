"""Where burst-jupyter keeps its files: one data folder per user (platformdirs), ``BURST_HOME`` overrides it.

Tests and the quickstart set ``BURST_HOME`` to keep away from the real ledger.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["burst_home", "db_path", "local_jobs_dir", "logs_dir", "user_config_path"]


def burst_home() -> Path:
    env = os.environ.get("BURST_HOME")
    if env:
        home = Path(env).expanduser()
    else:
        import platformdirs

        home = Path(platformdirs.user_data_dir("burst-jupyter", appauthor=False))
    home.mkdir(parents=True, exist_ok=True)
    return home


def db_path() -> Path:
    """The one SQLite file: owned instances and the ledger, shared by every kernel and the CLI."""
    return burst_home() / "burst.sqlite3"


def local_jobs_dir() -> Path:
    path = burst_home() / "local"
    path.mkdir(parents=True, exist_ok=True)
    return path


def logs_dir() -> Path:
    path = burst_home() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def user_config_path() -> Path:
    """``BURST_CONFIG`` or the platform's user config dir: ``config.toml`` with the same keys as [tool.burst]."""
    env = os.environ.get("BURST_CONFIG")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("burst-jupyter", appauthor=False)) / "config.toml"
