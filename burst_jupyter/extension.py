"""``%load_ext burst_jupyter``: register the magics, install the exit hooks, report leftovers of dead kernels.

Kept light: IPython is already loaded; the session (SQLite), paramiko, ipywidgets and boto3 load when used.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .exit_hooks import ExitHooks

if TYPE_CHECKING:
    from .session import Session

__all__ = ["load_ipython_extension", "unload_ipython_extension"]

_state: dict[str, Any] = {}


def load_ipython_extension(shell: Any) -> None:
    from .magics import BurstMagics

    magics = BurstMagics(shell)
    shell.register_magics(magics)
    hooks = ExitHooks(_live_session)
    hooks.install()
    _state.update(magics=magics, hooks=hooks)
    _report_leftovers()


def _live_session() -> Session | None:
    """The process's session if one was ever made; at exit, never import (or create) one just to find none."""
    module = sys.modules.get(f"{__package__}.session")
    return None if module is None else module.Session._current


def _report_leftovers() -> None:
    """Say what is wrong before the first cell: a bad [tool.burst] or user config, and what kernels that are gone
    left running. Reads only the config files and the state store (no session, no jobs machinery)."""
    from .config import load_settings
    from .errors import ConfigError
    from .paths import db_path
    from .state import StateStore

    try:
        load_settings()
    except ConfigError as exc:
        print(f"burst: {exc}")
    try:
        store = StateStore(db_path())
        try:
            leftovers = store.orphans()
        finally:
            store.close()
    except Exception as exc:  # a broken state file must not stop the extension from loading
        print(f"burst: could not read the state store: {exc}")
        return
    if leftovers:
        listed = ", ".join(f"{o.provider} {o.instance_id or o.job_id}" for o in leftovers[:5])
        more = f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else ""
        print(f"burst: {len(leftovers)} instance(s) left by a kernel that is gone: {listed}{more}. "
              f"`%burst cleanup` syncs them back and ends them.")


def unload_ipython_extension(shell: Any) -> None:
    """Undo everything ``load`` did, so ``%reload_ext`` does not register twice."""
    hooks = _state.pop("hooks", None)
    if hooks is not None:
        hooks.uninstall()
    magics = _state.pop("magics", None)
    if magics is not None and magics in shell.configurables:
        shell.configurables.remove(magics)  # Magics.__init__ added it; a reload would otherwise keep two
    shell.magics_manager.magics["cell"].pop("burst", None)
    shell.magics_manager.magics["line"].pop("burst", None)
