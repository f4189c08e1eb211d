"""``%load_ext burst_jupyter``: register the magics, install the exit hooks, report leftovers of dead kernels.

Kept light: IPython is already loaded; the session (SQLite), paramiko, ipywidgets and boto3 load when used.
"""

from __future__ import annotations

from typing import Any

from .shutdown import ExitHooks

__all__ = ["load_ipython_extension", "unload_ipython_extension"]

_state: dict[str, Any] = {}


def load_ipython_extension(shell: Any) -> None:
    from .magics import BurstMagics
    from .session import Session

    magics = BurstMagics(shell)
    shell.register_magics(magics)
    hooks = ExitHooks(lambda: Session._current)
    hooks.install()
    _state.update(magics=magics, hooks=hooks)
    _report_leftovers()


def _report_leftovers() -> None:
    from .errors import ConfigError
    from .session import Session

    try:
        leftovers = Session.current().state.orphans()
    except ConfigError as exc:  # a bad [tool.burst] or user config: say so, not "state store"
        print(f"burst: {exc}")
        return
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
