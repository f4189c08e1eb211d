"""The package's shape: public names stay what they are, and %load_ext stays light."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import burst_jupyter
from burst_jupyter import agent


def test_no_submodule_shadows_a_public_name() -> None:
    """Importing a submodule binds its name on the package: `burst_jupyter.shutdown` (a module) once hid
    `burst.shutdown()`. Import every submodule, then check each public name is still what __all__ promises."""
    for info in pkgutil.walk_packages(burst_jupyter.__path__, "burst_jupyter."):
        importlib.import_module(info.name)
    for name in burst_jupyter.__all__:
        assert not isinstance(getattr(burst_jupyter, name), types.ModuleType), name


def test_load_ext_imports_no_heavy_dependency(tmp_path: Path) -> None:
    """A new user's %load_ext (no settings file, no marketplace) builds no pydantic model and imports none of what
    a job needs: that is the first cell's work (issue 10: the load added 200-260 ms, most of it these)."""
    code = (
        "from IPython.testing.globalipapp import start_ipython\n"
        "ip = start_ipython()\n"
        "ip.run_line_magic('load_ext', 'burst_jupyter')\n"
        "import sys\n"
        "heavy = ['paramiko', 'ipywidgets', 'boto3', 'httpx', 'pydantic', 'burst_jupyter.session',\n"
        "         'burst_jupyter.job', 'burst_jupyter.spec', 'burst_jupyter.config', 'burst_jupyter.agent',\n"
        "         'burst_jupyter.reconcile']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"VAST_API_KEY", "RUNPOD_API_KEY", "TNR_API_TOKEN"}}
    env.update(BURST_HOME=str(tmp_path / "home"), BURST_CONFIG=str(tmp_path / "none.toml"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=tmp_path).stdout
    lines = out.splitlines()
    assert lines and lines[-1] == "", lines  # the last line lists what was imported: nothing


def test_the_agent_is_one_file_of_the_standard_library() -> None:
    """agent.py runs alone on the instance (BOOT execs its source from stdin): it imports nothing of this package
    and nothing from outside the standard library, but for cloudpickle where the instance has it (a --pull value
    pickle cannot write). The client imports the protocol's names from it, never the other way round."""
    tree = ast.parse(Path(agent.__file__).read_text())
    relative = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    assert relative == [] and modules - sys.stdlib_module_names == {"cloudpickle"}
