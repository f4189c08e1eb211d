"""``--push`` and ``--pull``: notebook variables to and from the cell, each pickled on its own.

Pickle first; cloudpickle (when installed) for what plain pickle cannot carry, such as functions and classes
defined in the notebook. Every failure names the variable.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import VariableError
from .limits import env_limit

__all__ = ["NO_RESULT", "PulledValues", "assigned_names", "check_pulls", "pack_push", "pull_limit", "unpack_pulled"]


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
    problems: list[str] = field(default_factory=list)


def pull_limit() -> int:
    """The most bytes of pulled values a job may bring back: ``BURST_PULL_BYTES`` (default 512 MiB)."""
    return env_limit("BURST_PULL_BYTES", 512 << 20)


def unpack_pulled(blob: bytes | None, names: Iterable[str]) -> PulledValues:
    """Decode the agent's values file (``agent.write_values``). Only the names asked for are unpickled, each from
    its own bytes: the container is JSON, so reading it runs nothing. Missing or unpicklable variables become
    problems naming them. A file that is not what the agent writes (malformed, a name not asked for) raises one
    :class:`VariableError` and nothing of it is unpickled. Its size is bounded where it is received: sync_back.py
    refuses one over :func:`pull_limit` before reading it."""
    wanted = list(names)
    out = PulledValues()
    if not wanted:
        return out  # nothing asked for: whatever came back is never read
    index, blobs = _read_values(blob or b"", wanted)
    for name in wanted:
        entry = index.get(name, ["missing"])
        if entry[0] == "ok":
            try:
                out.values[name] = pickle.loads(blobs[name])
            except Exception as exc:
                out.problems.append(f"--pull {name}: cannot unpickle it here: {type(exc).__name__}: {exc}")
        elif entry[0] == "missing":
            out.problems.append(f"--pull {name}: the cell did not define {name!r}")
        else:
            out.problems.append(f"--pull {name}: cannot pickle it on the instance: {entry[1:]}")
    return out


def _read_values(blob: bytes, wanted: list[str]) -> tuple[dict[str, list[Any]], dict[str, bytes]]:
    """The index and each name's pickle bytes, checked against the file's own sizes and the names asked for."""
    from .agent import VALUES_MAGIC  # the agent's module is loaded with the first job, not with the extension

    magic, _, rest = blob.partition(b"\n")
    head, _, body = rest.partition(b"\n")
    try:
        index = json.loads(head) if magic + b"\n" == VALUES_MAGIC else None
    except ValueError:
        index = None
    if not isinstance(index, dict) or not all(
            isinstance(e, list) and e and e[0] in ("ok", "missing", "error")
            and (e[0] != "ok" or (len(e) == 2 and isinstance(e[1], int) and e[1] >= 0)) for e in index.values()):
        raise VariableError("--pull: the values file from the instance is not one burst writes; nothing was "
                            "unpickled")
    extra = sorted(set(index) - set(wanted))
    if extra:
        raise VariableError(f"--pull: the instance sent variables that were not asked for ({', '.join(extra)}); "
                            "nothing was unpickled")
    blobs: dict[str, bytes] = {}
    at = 0
    for name, entry in index.items():
        if entry[0] == "ok":
            blobs[name] = body[at : at + entry[1]]
            at += entry[1]
    if at != len(body):
        raise VariableError("--pull: the values file from the instance does not match its own index; nothing was "
                            "unpickled")
    return index, blobs
