"""Showing a job in the cell that started it: the JobView, and the remote stdout/stderr and displays (plots, tables)
as the cell's own.

Two modes:

- **blocking** (``%%burst``, ``burst.run``): the main thread pumps the job's events from a queue, writes output
  with ``sys.stdout``/``sys.stderr`` and updates the view, so ordering and routing are exactly those of a local
  cell, and Ctrl-C lands where it can cancel the job.
- **background** (``--background``): the session loop thread is the view's single writer; output goes out as
  IOPub stream messages carrying the parent header captured when the job started, so it reaches that cell even
  from another thread (ipykernel 7 otherwise sends thread output to the latest cell).

Without a kernel (terminal IPython) the view's text lines are printed instead of a widget.

When the job ends its view is shown again, as it ended, under one display id (``update_display_data``): that is
what a saved or exported notebook keeps. A background job's end is also sent to the cell running at that moment,
with the job's output (bounded): nbclient and papermill only listen to the running cell, so the streams of a cell
that already finished never reach the notebook they write, but an update of a display id reaches every cell
showing it. Front ends that listen to every cell (JupyterLab, Notebook 7) ignore an id the running cell does not
show.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import queue
import sys
import threading
import time
import uuid
from html import escape
from typing import TYPE_CHECKING, Any

from .errors import JobInterrupted, RemoteError
from .events import EventType, JobEvent

if TYPE_CHECKING:
    from .job import Job, JobResult
    from .widgets import JobView

__all__ = ["CellDisplay"]

# Seconds between view refreshes: elapsed time and cost, and whatever the view's 10 Hz throttle held back (a
# progress update right after an output line). Cheap: a refresh sends only the widget traits that changed.
_TICK = 0.2
# How much of a background job's output its final view carries to a notebook that missed the streams (the last
# characters; the whole output is in the job's log).
_TAIL_CHARS = 100_000


class CellDisplay:
    def __init__(self, job: Job, shell: Any | None) -> None:
        from .widgets import JobView

        self.job = job
        self.kernel = getattr(shell, "kernel", None)
        self.parent = shell.get_parent() if shell is not None and self.kernel is not None else None
        self.view: JobView = JobView(job_id=job.id, name=job.spec.name, max_cost_usd=job.plan.cap_usd)
        self.display_id = uuid.uuid4().hex
        self._shown = False
        self._last_stream: str | None = None
        self._tail: collections.deque[str] = collections.deque()  # background output, for the final view
        self._tail_chars = 0
        self._tail_cut = False

    @property
    def text_mode(self) -> bool:
        return self.kernel is None

    def show(self) -> bool:
        """Display the view in the running cell (again, where shown before: one display id, updated as one).
        False in text mode, where there is nothing to display."""
        if self.text_mode:
            return False
        from IPython.display import display

        display(self.view, display_id=self.display_id)  # type: ignore[no-untyped-call]
        self._shown = True
        return True

    # -- blocking ---------------------------------------------------------------------------------------------

    def run_blocking(self) -> JobResult:
        """Pump events on this (main) thread until the job ends. Ctrl-C cancels the job, waits for its clean-up
        (sync back, terminate, settle), then raises JobInterrupted (a KeyboardInterrupt) saying so in one line."""
        events: queue.SimpleQueue[JobEvent] = queue.SimpleQueue()
        remove = self.job.add_listener(events.put)
        interrupted = False
        last_tick = time.monotonic()
        try:
            while True:
                try:
                    try:
                        event = events.get(timeout=0.1)
                    except queue.Empty:
                        event = None
                    if event is not None:
                        self._on_event(event, blocking=True)
                        if event.is_final:
                            break
                    if time.monotonic() - last_tick >= _TICK:
                        last_tick = time.monotonic()
                        self.view.tick()
                except KeyboardInterrupt:
                    if interrupted:
                        # A second Ctrl-C: stop waiting; the clean-up goes on in the session loop regardless.
                        raise JobInterrupted(f"burst: job {self.job.id} is still being cleaned up in the "
                                             "background (burst jobs)") from None
                    interrupted = True
                    sys.stderr.write("burst: cancelling: syncing back, terminating, settling the bill "
                                     "(Ctrl-C again to leave that to the background)\n")
                    self.job.cancel()
        finally:
            remove()
        result = self.job.result()
        if interrupted:
            # One line, not the frames of burst it went through: what became of the job is all the user asked.
            raise self.job.interrupted(result)
        error = result.error
        if self.kernel is None and isinstance(error, RemoteError):
            # A terminal prints the remote traceback as it stands (a notebook renders it inert): no escapes.
            from .widgets.render import clean_text

            error = RemoteError(clean_text(error.ename), clean_text(error.evalue),
                                [clean_text(line) for line in error.traceback])
            result = dataclasses.replace(result, error=error)
        return result

    # -- background -------------------------------------------------------------------------------------------

    def follow_in_background(self) -> None:
        """Render from the session loop thread from now on (the view's single writer). The job then displays as
        this view (``Job._ipython_display_``): the cell's ``Out`` follows the job instead of freezing its repr."""
        self.job.add_listener(lambda e: self._on_event(e, blocking=False))
        self.job.shown_by(self.show)
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        loop = self.job._loop

        def tick() -> None:
            if self.job.done():
                return
            self.view.tick()
            loop.call_later(_TICK, tick)

        loop.call_soon_threadsafe(tick)

    # -- shared ---------------------------------------------------------------------------------------------

    def _on_event(self, event: JobEvent, *, blocking: bool) -> None:
        if event.type is EventType.OUTPUT:
            self._write(event.stream or "stdout", event.text or "", blocking=blocking)
            if not blocking and not self.text_mode:
                self._keep(event.text or "")
            self.view.handle(event)
            return
        if event.type is EventType.DISPLAY:
            self._display(event.data or {}, blocking=blocking)
            self.view.handle(event)
            return
        self.view.handle(event)
        if self.text_mode:
            line = self.view.text_line(event)
            if line:
                self._write("stdout", f"[burst] {line}\n", blocking=blocking)
        if event.is_final:
            self._refresh_snapshot(final=True)
            if not blocking:
                self._report_background_end()
        elif event.type is EventType.STARTED:
            self._refresh_snapshot(final=False)

    def _keep(self, text: str) -> None:
        """The end of a background job's output, bounded, for cells that never saw its streams."""
        self._tail.append(text)
        self._tail_chars += len(text)
        while self._tail_chars > _TAIL_CHARS:
            over = self._tail_chars - _TAIL_CHARS
            first = self._tail.popleft()
            if len(first) > over:
                self._tail.appendleft(first[over:])
            self._tail_chars -= min(len(first), over)
            self._tail_cut = True

    def _report_background_end(self) -> None:
        """A background job has nobody waiting to raise its error: show its traceback in its cell.

        The final event is emitted before the job's result is set, so report once it is (waiting for it here, on
        the loop thread that is about to set it, would only stall the job)."""

        def report(future: Any) -> None:
            error = future.result().error
            if isinstance(error, RemoteError):
                self._write("stderr", "\n".join(error._render_traceback_()) + "\n", blocking=False)
            elif error is not None:
                self._write("stderr", f"burst: job {self.job.id}: {error}\n", blocking=False)

        self.job._future.add_done_callback(report)

    def _refresh_snapshot(self, *, final: bool) -> None:
        """Re-publish the displayed view at the job's turning points, so the text/plain and text/html kept in the
        notebook say how it ended (nbconvert and nbclient keep the last update). Only then: a re-publish makes
        JupyterLab rebuild the widget's view, and the live widget updates itself over its comm anyway."""
        kernel = self.kernel
        if not self._shown or kernel is None:
            return
        if threading.current_thread() is threading.main_thread():
            from IPython.display import update_display

            update_display(self.view, display_id=self.display_id)  # type: ignore[no-untyped-call]
            return
        from IPython.core.formatters import format_display_data

        bundle, _ = format_display_data(self.view)  # type: ignore[no-untyped-call]
        self._send_update(kernel, bundle, self.parent)
        # The request the kernel runs now. In an empty context: ipykernel 7 keeps the parent in a ContextVar, and
        # this callback runs in a copy of the context that submitted the job, where it is still the first cell.
        now = contextvars.Context().run(kernel.get_parent, "shell") if final else None
        if now and self.parent and now.get("header", {}).get("msg_id") != self.parent["header"].get("msg_id"):
            self._send_update(kernel, self._with_output(bundle), now)

    def _with_output(self, bundle: dict[str, Any]) -> dict[str, Any]:
        text = "".join(self._tail)
        if not text:
            return bundle
        from .widgets.render import clean_text, no_math

        if self._tail_cut:
            text = f"[burst: earlier output left out; the whole of it: burst show {self.job.id}]\n…{text}"
        html = no_math(f'<pre class="burst-output">{escape(clean_text(text))}</pre>')
        return {**bundle, "text/plain": f"{bundle.get('text/plain', '')}\n{text}",
                "text/html": bundle.get("text/html", "") + html}

    def _send_update(self, kernel: Any, bundle: dict[str, Any], parent: Any) -> None:
        """``update_display_data`` for this view's display id, on behalf of the cell ``parent`` (any thread)."""
        kernel.session.send(kernel.iopub_socket, "update_display_data",
                            content={"data": bundle, "metadata": {}, "transient": {"display_id": self.display_id}},
                            parent=parent, ident=b"update_display_data")

    def _display(self, data: dict[str, Any], *, blocking: bool) -> None:
        """What the remote cell displayed (already inert), as the cell's own display data; its text in a terminal."""
        if self.kernel is None:
            self._write("stdout", f"{data.get('text/plain', '')}\n", blocking=blocking)
        elif blocking:
            from IPython.display import publish_display_data

            sys.stdout.flush()  # after what was printed before it
            sys.stderr.flush()
            publish_display_data(data)  # type: ignore[no-untyped-call]
        else:
            self.kernel.session.send(self.kernel.iopub_socket, "display_data",
                                     content={"data": data, "metadata": {}, "transient": {}}, parent=self.parent,
                                     ident=b"display_data")

    def _write(self, stream: str, text: str, *, blocking: bool) -> None:
        if not text:
            return
        if blocking or self.kernel is None:
            out = sys.stderr if stream == "stderr" else sys.stdout
            if self._last_stream not in (None, stream):
                # Keep stdout/stderr interleaving: push out what the other stream buffered first.
                (sys.stdout if stream == "stderr" else sys.stderr).flush()
            if self.kernel is None:
                # A terminal (`burst submit`, terminal IPython), now or when a redirected log is shown in one:
                # remote escapes could set its title, write its clipboard (OSC 52) or hide lines. A notebook
                # renders ANSI colours safely, so they stay there.
                from .widgets.render import clean_text

                text = clean_text(text)
            out.write(text)
            out.flush()
            self._last_stream = stream
            return
        # Background, in a kernel: an IOPub stream message with the starting cell's parent header.
        session, socket = self.kernel.session, self.kernel.iopub_socket
        session.send(socket, "stream", content={"name": stream, "text": text}, parent=self.parent,
                     ident=f"stream.{stream}".encode())
