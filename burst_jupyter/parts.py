"""The parts every process that works on this install's jobs builds from its state folder (``BURST_HOME``): the
state store and the ledger (one SQLite file), the SSH connections, and the install's owner tag. A kernel's
:class:`~burst_jupyter.session.Session`, the load-time reconciliation and a detached reaper each open their own with
:func:`open_parts`."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .budget import Budget
from .connections import Connections
from .paths import DB_NAME, open_private
from .state import StateStore

if TYPE_CHECKING:
    from .budget import Cap

__all__ = ["InstallParts", "install_tag", "open_parts"]


@dataclass(frozen=True)
class InstallParts:
    """One install's shared parts; a job's lifecycle gets them from its session, with the session's owner and clock."""

    home: Path
    state: StateStore
    budget: Budget
    connections: Connections
    tag: str  # this install's owner tag (install_tag)

    def close(self) -> None:
        self.connections.close_all()
        self.state.close()
        self.budget.close()


def open_parts(home: Path, *, caps: Iterable[Cap] = ()) -> InstallParts:
    """The parts of the install whose state folder is ``home``; ``caps``: the spending caps its config sets."""
    db = home / DB_NAME
    return InstallParts(home=home, state=StateStore(db), budget=Budget(db, config_caps=caps), connections=Connections(),
                 tag=install_tag(home))


def install_tag(home: Path) -> str:
    """This install's owner tag, put on everything it rents so reconciliation finds it at the provider."""
    path = home / "install-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        tag = f"burst-{secrets.token_hex(4)}"
        with open_private(path, "w") as file:
            file.write(tag + "\n")
        return tag
