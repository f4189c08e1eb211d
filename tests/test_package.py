"""The package's shape: public names stay what they are, and %load_ext stays light."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types

import burst_jupyter


def test_no_submodule_shadows_a_public_name() -> None:
    """Importing a submodule binds its name on the package: `burst_jupyter.shutdown` (a module) once hid
    `burst.shutdown()`. Import every submodule, then check each public name is still what __all__ promises."""
    for info in pkgutil.walk_packages(burst_jupyter.__path__, "burst_jupyter."):
        importlib.import_module(info.name)
    for name in burst_jupyter.__all__:
        assert not isinstance(getattr(burst_jupyter, name), types.ModuleType), name


def test_load_ext_imports_no_heavy_dependency() -> None:
    code = (
        "from IPython.testing.globalipapp import start_ipython\n"
        "ip = start_ipython()\n"
        "ip.run_line_magic('load_ext', 'burst_jupyter')\n"
        "import sys\n"
        "heavy = ['paramiko', 'ipywidgets', 'boto3', 'httpx', 'burst_jupyter.session', 'burst_jupyter.job']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines and lines[-1] == "", lines  # the last line lists what was imported: nothing
