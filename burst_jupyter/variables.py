"""``--push`` and ``--pull``: notebook variables to and from the cell, each pickled on its own.

Pickle first; cloudpickle (when installed) for what plain pickle cannot carry, such as functions and classes
defined in the notebook. Every failure names the variable.
"""

from __future__ import annotations

import ast
import io
import pickle
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import VariableError

__all__ = ["NO_RESULT", "PulledValues", "assigned_names", "check_pulls", "pack_push", "unpack_pulled"]

RESULT_KEY = "__burst_result__"


class _NoResult:
    def __repr__(self) -> str:
        return "NO_RESULT"


NO_RESULT: Any = _NoResult()


class _NotPortable(Exception):
    pass


class _NoMainReferences(pickle.Pickler):
    """Plain pickle, refusing what it would save as a reference to ``__main__``: in a kernel the notebook *is*
    ``__main__``, so pickle happily writes "__main__.f", which the instance cannot resolve."""

    def reducer_override(self, obj: object) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) == "__main__":
            raise _NotPortable(f"{type(obj).__name__} {getattr(obj, '__qualname__', obj)!r}")
        return NotImplemented


def _dumps(name: str, value: object) -> bytes:
    """cloudpickle when installed (it sends what the notebook defined by value); else plain pickle, refusing
    notebook-defined functions and classes rather than sending a reference the instance cannot resolve."""
    try:
        import cloudpickle
    except ImportError:
        buffer = io.BytesIO()
        try:
            _NoMainReferences(buffer, protocol=4).dump(value)
        except _NotPortable as exc:
            raise VariableError(f"--push {name}: it holds {exc}, defined in the notebook, which only "
                                f"cloudpickle can send (pip install cloudpickle)") from None
        except Exception as exc:
            raise VariableError(f"--push {name}: cannot pickle {type(value).__name__}: {exc}; "
                                f"pip install cloudpickle may help") from None
        return buffer.getvalue()
    try:
        return cloudpickle.dumps(value, protocol=4)  # type: ignore[no-any-return]
    except Exception as exc:
        raise VariableError(f"--push {name}: cannot pickle {type(value).__name__}: {exc}") from None


def pack_push(names: Iterable[str], namespace: Mapping[str, Any]) -> dict[str, bytes]:
    """Pickle each named variable. Raises :class:`VariableError` naming the first missing or unpicklable one."""
    packed: dict[str, bytes] = {}
    for name in names:
        if name not in namespace:
            raise VariableError(f"--push {name}: no variable named {name!r} in the notebook")
        packed[name] = _dumps(name, namespace[name])
    return packed


class _Binder(ast.NodeVisitor):
    """Collects every name a cell can bind at its top level (and flags what defeats static analysis)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.dynamic = False

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self.names.add(node.id)
        elif node.id in {"globals", "exec", "vars", "locals"}:
            self.dynamic = True

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.names.add(node.name)
        for stmt in node.body:  # `global x` inside a function binds x at the top level
            if isinstance(stmt, ast.Global):
                self.names.update(stmt.names)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.names.add(node.name)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        pass

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.names.add(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "*":
                self.dynamic = True
            else:
                self.names.add(alias.asname or alias.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.names.add(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node: Any) -> None:
        if node.name:
            self.names.add(node.name)
        self.generic_visit(node)

    visit_MatchStar = visit_MatchAs

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id == "get_ipython":
            self.dynamic = True
        self.generic_visit(node)


def assigned_names(tree: ast.AST) -> tuple[set[str], bool]:
    """Names the cell may bind, and whether it does something (``exec``, ``import *``) that hides bindings."""
    binder = _Binder()
    binder.visit(tree)
    return binder.names, binder.dynamic


def check_pulls(pulls: Iterable[str], tree: ast.AST, pushed: Iterable[str]) -> None:
    """Refuse, before anything is rented, to pull a name the cell can never define."""
    names, dynamic = assigned_names(tree)
    if dynamic:
        return
    known = names | set(pushed)
    for name in pulls:
        if name not in known:
            raise VariableError(f"--pull {name}: the cell never assigns {name!r}")


@dataclass
class PulledValues:
    values: dict[str, Any] = field(default_factory=dict)
    result: Any = NO_RESULT
    problems: list[str] = field(default_factory=list)


class _ReprResult:
    """The last expression's value when it could not travel back: its repr, shown as the cell's output."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def unpack_pulled(blob: bytes | None, names: Iterable[str]) -> PulledValues:
    """Decode ``values.out.pkl``. Missing or unpicklable variables become problems naming them."""
    out = PulledValues()
    table: dict[str, tuple[str, Any]] = pickle.loads(blob) if blob else {}
    for name in names:
        status, payload = table.get(name, ("missing", None))
        if status == "ok":
            try:
                out.values[name] = pickle.loads(payload)
            except Exception as exc:
                out.problems.append(f"--pull {name}: cannot unpickle it here: {type(exc).__name__}: {exc}")
        elif status == "missing":
            out.problems.append(f"--pull {name}: the cell did not define {name!r}")
        else:
            out.problems.append(f"--pull {name}: cannot pickle it on the instance: {payload}")
    status, payload = table.get(RESULT_KEY, ("missing", None))
    if status == "ok":
        try:
            out.result = pickle.loads(payload)
        except Exception as exc:
            out.result = _ReprResult(f"<result could not be unpickled: {type(exc).__name__}: {exc}>")
    elif status == "repr":
        out.result = _ReprResult(str(payload))
    return out
