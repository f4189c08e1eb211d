"""``%load_ext burst_jupyter``: register the magics, install the exit hooks, report leftovers of dead kernels, and
start reconciliation (reconcile.py) in a background thread.

Kept light: IPython is already loaded; the session, pydantic (settings are validated here only when a settings
file exists), httpx, paramiko, ipywidgets and boto3 load when used, and the providers in the background thread.
"""

from __future__ import annotations

import sys
from pathlib import Path
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
    if _report_leftovers():
        from .reconcile import start_background

        start_background()


def _live_session() -> Session | None:
    """The process's session if one was ever made; at exit, never import (or create) one just to find none."""
    module = sys.modules.get(f"{__package__}.session")
    return None if module is None else module.Session._current


def _report_leftovers() -> bool:
    """Say what is wrong before the first cell: a bad [tool.burst] or user config, and what kernels that are gone
    left running. Reads only the config files, the environment and the state store (no session, no jobs
    machinery, no network). Returns whether reconciliation has anything to ask: a marketplace account,
    leftovers, or local job folders."""
    from .config_files import has_settings_files
    from .errors import ConfigError
    from .paths import burst_home, db_path, has_local_jobs, user_config_path
    from .providers.accounts import accounts
    from .state import StateStore

    markets = False
    try:
        settings = None
        if has_settings_files(user_config_path(), Path.cwd()):
            from .config import load_settings

            settings = load_settings()
        markets = bool(accounts(settings))
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
        return False
    if leftovers:
        listed = ", ".join(f"{o.provider} {o.instance_id or o.job_id}" for o in leftovers[:5])
        more = f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else ""
        print(f"burst: {len(leftovers)} instance(s) left by a kernel that is gone: {listed}{more}. They are being "
              f"synced back and ended in the background; `%burst cleanup` shows what was done.")
    return markets or bool(leftovers) or has_local_jobs(burst_home())


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
