"""--push pickling: what the notebook defines travels by value, and without cloudpickle it is refused up front."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from burst_jupyter.errors import VariableError
from burst_jupyter.variables import pack_push


def _notebook_function() -> types.FunctionType:
    """A function as a kernel has it: defined in the module pickle knows as __main__."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec("def f(x):\n    return x * 2\n", namespace)
    f = namespace["f"]
    assert isinstance(f, types.FunctionType)
    return f


def test_a_notebook_function_travels_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    main = types.ModuleType("__main__")
    f = _notebook_function()
    main.f = f  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__main__", main)  # as in ipykernel: plain pickle would save "__main__.f"
    blob = pack_push(["f"], {"f": f})["f"]
    # A fresh interpreter has no __main__.f: only a by-value pickle can be loaded there.
    code = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read())(21))"
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True).stdout
    assert out == b"42\n"


def test_without_cloudpickle_a_notebook_function_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cloudpickle", None)  # `import cloudpickle` now raises ImportError
    main = types.ModuleType("__main__")
    f = _notebook_function()
    main.f = f  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__main__", main)
    with pytest.raises(VariableError, match=r"--push model: .*'f'.*cloudpickle"):
        pack_push(["model"], {"model": {"fn": f}})
    # Plain values still go with plain pickle.
    assert pack_push(["x"], {"x": [1, 2.5, "a"]})["x"]
