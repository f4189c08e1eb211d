"""What a cell sends back to show, bounded and inert: its printed output (:class:`OutputBounds`), and its value and
what it displayed (:class:`RemoteDisplay`).

The instance is a stranger's computer, and a cell may print without end. The notebook gets a bounded head and
tail of the output with one line saying how much was left out and where the whole of it is; that file is capped
too; and what the kernel holds stays bounded whatever the cell prints.
"""

from __future__ import annotations

import base64
import binascii
import collections
import html
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from .job_log import log_limit
from .limits import env_limit
from .paths import open_private, private_dir

__all__ = ["OutputBounds", "RemoteDisplay", "output_log_path"]

# What one output event costs beside its text, so a cell that prints a character at a time fills the budget too.
_EVENT_COST = 100
_MIB = 1 << 20


def output_log_path(log_dir: Path, job_id: str) -> Path:
    """The whole remote output of a job (up to ``BURST_LOG_BYTES``), beside its event log."""
    return log_dir / f"{job_id}.out"


def _size(n: int) -> str:
    return f"{n / _MIB:.1f} MB" if n >= _MIB else f"{n} bytes"


class _CappedFile:
    """Appends text to a private file (0600) until ``cap`` bytes, then one line saying how much was cut off."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path, self.cap = path, cap
        self.written = self.cut = 0
        self._file: IO[bytes] | None = None
        self._broken = self._noted = False

    def write(self, text: str) -> None:
        if self._broken:
            return
        data = text.encode("utf-8", "replace")
        room = max(self.cap - self.written, 0)
        keep, self.cut = data[:room], self.cut + max(len(data) - room, 0)
        if not keep:
            return
        try:
            if self._file is None:
                private_dir(self.path.parent)
                self._file = open_private(self.path, "ab", buffering=0)
            self._file.write(keep)
            self.written += len(keep)
        except OSError:
            self._broken = True  # the log is a convenience: a full disk must not fail the job
            self.close()

    def close(self) -> None:
        file, self._file = self._file, None
        try:
            if file is not None and self.cut and not self._noted:
                self._noted = True
                file.write(f"\n[burst: the log stops at {_size(self.cap)} (BURST_LOG_BYTES); "
                           f"{_size(self.cut)} more output was not kept]\n".encode())
        except OSError:
            pass
        finally:
            if file is not None:
                file.close()


class OutputBounds:
    """The remote output of one job: all of it (up to a cap) into ``log``; to the notebook a head, then a tail.

    The notebook limit (``BURST_NOTEBOOK_OUTPUT_CHARS``, default 2 M characters) is split in two: the first half
    is shown as it comes; after that the latest half is kept, and shown when the cell ends (:meth:`finish`),
    after a line saying how much was left out and where the whole output is.
    """

    def __init__(self, log: Path | None) -> None:
        limit = env_limit("BURST_NOTEBOOK_OUTPUT_CHARS", 2_000_000)
        self.head_room = limit // 2
        self.tail_room = limit - self.head_room
        self.log = None if log is None else _CappedFile(log, log_limit())
        self.tail: collections.deque[tuple[str, str]] = collections.deque()
        self.tail_cost = 0
        self.left_out = 0  # characters dropped from the tail
        self.displays_left_out = 0

    def admit(self, bundle: Mapping[str, Any]) -> bool:
        """Whether a display is shown: while the head has room for it, as for output (its size counts against
        the head). Past the head a display is left out, and :meth:`finish` says how many were."""
        cost = len(json.dumps(bundle)) + _EVENT_COST
        if not self.tail and cost <= self.head_room:
            self.head_room -= cost
            return True
        self.displays_left_out += 1
        return False

    def feed(self, stream: str, text: str) -> list[tuple[str, str]]:
        """What to show now of this piece of output (nothing once the head is spent)."""
        if self.log is not None:
            self.log.write(text)
        cost = len(text) + _EVENT_COST
        if not self.tail and cost <= self.head_room:
            self.head_room -= cost
            return [(stream, text)]
        if not self.tail and self.head_room > _EVENT_COST:  # the head's last piece: what fits
            cut = self.head_room - _EVENT_COST
            self.head_room = 0
            self.tail.append((stream, text[cut:]))
            self.tail_cost += len(text) - cut + _EVENT_COST
            self._trim()
            return [(stream, text[:cut])]
        self.head_room = 0
        self.tail.append((stream, text))
        self.tail_cost += cost
        self._trim()
        return []

    def _trim(self) -> None:
        while self.tail_cost > self.tail_room and self.tail:
            stream, text = self.tail[0]
            over = self.tail_cost - self.tail_room
            if len(self.tail) > 1 or over >= len(text) + _EVENT_COST:
                self.tail.popleft()
                self.tail_cost -= len(text) + _EVENT_COST
                self.left_out += len(text)
            else:  # keep the end of the one piece left
                self.tail[0] = (stream, text[over:])
                self.tail_cost -= over
                self.left_out += over

    def finish(self) -> list[tuple[str, str]]:
        """The line saying what was left out (if anything was), then the tail. Empties the tail."""
        shown: list[tuple[str, str]] = []
        if self.left_out:
            where = ""
            if self.log is not None:
                whole = "the whole output" if not self.log.cut else f"its first {_size(self.log.cap)}"
                where = f"; {whole} is in {self.log.path}"
            shown.append(("stderr", f"\n[burst: {self.left_out:,} characters of output left out here "
                                    f"(BURST_NOTEBOOK_OUTPUT_CHARS){where}]\n"))
            self.left_out = 0
        if self.displays_left_out:
            shown.append(("stderr", f"\n[burst: {self.displays_left_out:,} displayed outputs (plots, tables) left "
                                    "out here (BURST_NOTEBOOK_OUTPUT_CHARS)]\n"))
            self.displays_left_out = 0
        shown.extend(self.tail)
        self.tail.clear()
        self.tail_cost = 0
        if self.log is not None:
            self.log.close()
        return shown


# The display formats of a cell's value shown here (the agent sends no others), and what each may hold.
_IMAGES = ("image/png", "image/jpeg")
_MAX_DISPLAY = 512 * 1024


class RemoteDisplay:
    """A cell's value, or what it displayed, as the notebook would show it: its repr and display data, as inert data.

    It is never the value itself (that would need unpickling, which can run code: ``--pull`` it for that). HTML
    is shown in a sandboxed frame where no script runs; Markdown with its HTML escaped and its script links
    broken; JSON only as a JSON object or list; images only as base64 that decodes."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        def text(mime: str) -> str | None:
            value = data.get(mime)
            return value if isinstance(value, str) and len(value) <= _MAX_DISPLAY else None

        self.text = _clean(text("text/plain") or "")
        self.html = text("text/html")
        self.markdown = text("text/markdown")
        self.json = _bounded_json(data.get("application/json"))
        self.images = {mime: value for mime in _IMAGES if (value := text(mime)) is not None and _is_base64(value)}

    def __repr__(self) -> str:
        return self.text

    def bundle(self) -> dict[str, Any]:
        """What the notebook is given: every format inert."""
        bundle: dict[str, Any] = {"text/plain": self.text, **self.images}
        if self.html is not None:
            bundle["text/html"] = (f'<iframe sandbox="" srcdoc="{html.escape(self.html, quote=True)}" '
                                   'style="width:100%;height:24em;border:1px solid #ddd;resize:vertical"></iframe>')
        if self.markdown is not None:
            bundle["text/markdown"] = _inert_markdown(self.markdown)
        if self.json is not None:
            bundle["application/json"] = self.json
        return bundle

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.bundle()


# A link or image to a scheme that runs or embeds something; broken with a zero-width space before its colon.
_ACTIVE_SCHEME = re.compile(r"(?i)(javascript|vbscript|data|file)(\s*):")


def _inert_markdown(text: str) -> str:
    """Markdown that renders as the text it says: no raw HTML (a notebook renders a trusted output's HTML, scripts
    included), no character references that could spell it, no script links."""
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return _ACTIVE_SCHEME.sub("\\1\\2\u200b:", text)


def _bounded_json(value: Any) -> dict[str, Any] | list[Any] | None:
    if not isinstance(value, (dict, list)):
        return None
    try:
        return value if len(json.dumps(value)) <= _MAX_DISPLAY else None
    except (TypeError, ValueError, RecursionError):
        return None


def _clean(text: str) -> str:
    from .widgets.render import clean_text

    return clean_text(text)


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True
