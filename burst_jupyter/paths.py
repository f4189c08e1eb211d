"""Where burst-jupyter keeps its files: one data folder per user (platformdirs), ``BURST_HOME`` overrides it.

Tests and the quickstart set ``BURST_HOME`` to keep away from the real ledger.

The folder holds the ledger, every job's endpoint and output log and its SSH keys: it is the user's alone, 0700
with its files 0600 whatever the umask, and an older one made wider is tightened the first time a process uses
it (:func:`secure_home`). Files are created private from the start (:func:`open_private`).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path
from typing import IO, Any

__all__ = ["burst_home", "db_path", "has_local_jobs", "local_jobs_dir", "logs_dir", "open_private", "private_dir",
           "secure_home", "tighten", "user_config_path"]

_secured: set[Path] = set()
_secured_lock = threading.Lock()


def burst_home() -> Path:
    env = os.environ.get("BURST_HOME")
    if env:
        home = Path(env).expanduser()
    else:
        import platformdirs

        home = Path(platformdirs.user_data_dir("burst-jupyter", appauthor=False))
    return secure_home(home)


def secure_home(home: Path) -> Path:
    """``home`` made 0700; once per process, everything already in it made owner-only too (a folder made under
    a wide umask, or by an older version). The local provider's job folders are not walked: ``local`` itself is
    0700, and a job's own files keep their modes for the cell that runs there."""
    private_dir(home)
    with _secured_lock:
        if home in _secured:
            return home
        _secured.add(home)
    # Plain strings, not Paths: this walks every job's logs at each %load_ext, and Path objects cost most of it.
    top = str(home)
    for root, dirs, files in os.walk(top):
        if root == top and "local" in dirs:
            dirs.remove("local")
            tighten(home / "local")
        for name in (*dirs, *files):
            tighten(os.path.join(root, name))
    return home


def private_dir(path: Path) -> Path:
    """``path`` made and kept 0700, even if it already existed wider; a missing parent is made 0700 too (mkdir's
    own ``parents`` would make those under the umask)."""
    for folder in [*reversed(path.parents), path]:
        if not folder.is_dir():
            folder.mkdir(mode=0o700, exist_ok=True)
    tighten(path)
    return path


def tighten(path: str | os.PathLike[str]) -> None:
    """Take group and other bits off ``path`` (never following a link); what cannot be changed is left."""
    with contextlib.suppress(OSError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077:
            os.chmod(path, stat.S_IMODE(mode) & ~0o077)


def open_private(path: Path, mode: str, **kwargs: Any) -> IO[Any]:
    """``open(path, mode)`` ("a", "ab", "w", "wb"), but a file it creates is 0600 from the first byte."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0) | (os.O_APPEND if mode[0] == "a" else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode, **kwargs)


DB_NAME = "burst.sqlite3"  # in a state folder


def db_path() -> Path:
    """The one SQLite file: owned instances and the ledger, shared by every kernel and the CLI."""
    return burst_home() / DB_NAME


def local_jobs_dir() -> Path:
    return private_dir(burst_home() / "local")


def has_local_jobs(home: Path) -> bool:
    """Whether the local provider has any job folder under ``home`` (cheap: no subprocess, nothing made)."""
    try:
        with os.scandir(home / "local") as entries:
            return any(True for _ in entries)
    except OSError:
        return False


def logs_dir() -> Path:
    return private_dir(burst_home() / "logs")


def user_config_path() -> Path:
    """``BURST_CONFIG`` or the platform's user config dir: ``config.toml`` with the same keys as [tool.burst]."""
    env = os.environ.get("BURST_CONFIG")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("burst-jupyter", appauthor=False)) / "config.toml"
