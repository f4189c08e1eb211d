"""Run a notebook headless (nbclient, a real ipykernel) and print what each cell showed, as plain text.

    python notebooks/execute.py notebooks/quickstart.ipynb [--save OUT.ipynb]

Used by ``./dev quickstart``. Prints stream output and the text/plain of every result and display, the way a
reader would see the notebook with widgets switched off; exits non-zero if a cell fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def _text(output: dict) -> str:  # type: ignore[type-arg]
    kind = output.get("output_type")
    if kind == "stream":
        return str(output.get("text", ""))
    if kind in ("execute_result", "display_data"):
        return str(output.get("data", {}).get("text/plain", "")) + "\n"
    if kind == "error":
        return "\n".join(output.get("traceback", [])) + "\n"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--save", type=Path, help="also write the executed notebook here")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(args.notebook.parent.resolve())}})
    failed = False
    try:
        client.execute()
    except CellExecutionError:
        failed = True
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print(f"\033[1mIn [{cell.get('execution_count') or ' '}]:\033[0m " + cell.source.replace("\n", "\n         "))
        for output in cell.get("outputs", []):
            sys.stdout.write(_text(output))
        print()
    if args.save:
        nbformat.write(nb, args.save)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
