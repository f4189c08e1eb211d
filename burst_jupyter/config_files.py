"""Reading the settings files without validating them: the user file and the nearest ``[tool.burst]`` table.

Light on purpose (tomllib only): ``%load_ext`` asks :func:`has_settings_files` and builds the pydantic
:class:`~.config.Settings` only when there is a file to check (config.py validates what these return).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

__all__ = ["PROJECT_TABLE", "find_project_table", "has_settings_files", "read_toml"]

PROJECT_TABLE = " [tool.burst]"  # ends the label of a project's table: "/p/pyproject.toml [tool.burst]"


def has_settings_files(user_path: Path, cwd: Path) -> bool:
    """Whether the user file or a ``[tool.burst]`` table from ``cwd`` up says anything (an unreadable or invalid
    one counts: it is what there is to report)."""
    try:
        return bool(read_toml(user_path)) or find_project_table(cwd.resolve()) is not None
    except ConfigError:
        return True


def find_project_table(start: Path) -> tuple[str, dict[str, Any]] | None:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if not candidate.is_file():
            continue
        tool = (read_toml(candidate) or {}).get("tool")
        table = tool.get("burst") if isinstance(tool, dict) else None
        if table is None:
            continue
        label = f"{candidate}{PROJECT_TABLE}"
        if not isinstance(table, dict):
            raise ConfigError(f"{label}: must be a table, not {type(table).__name__}")
        return label, table
    return None


def read_toml(path: Path) -> dict[str, Any] | None:
    """The parsed file, or None if it does not exist."""
    try:
        with path.open("rb") as file:
            data: dict[str, Any] = tomllib.load(file)  # annotated: tomli is untyped where mypy checks 3.10
            return data
    except FileNotFoundError:
        return None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
