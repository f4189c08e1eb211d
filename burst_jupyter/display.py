"""Showing a job in the cell that started it: the JobView, and the remote stdout/stderr as the cell's own streams.

Two modes:

- **blocking** (``%%burst``, ``burst.run``): the main thread pumps the job's events from a queue, writes output
  with ``sys.stdout``/``sys.stderr`` and updates the view, so ordering and routing are exactly those of a local
  cell, and Ctrl-C lands where it can cancel the job.
- **background** (``--background``): the session loop thread is the view's single writer; output goes out as
  IOPub stream messages carrying the parent header captured when the job started, so it reaches that cell even
  from another thread (ipykernel 7 otherwise sends thread output to the latest cell).

Without a kernel (terminal IPython) the view's text lines are printed instead of a widget.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from .errors import RemoteError
from .events import EventType, JobEvent

if TYPE_CHECKING:
    from .job import Job, JobResult
    from .widgets import JobView

__all__ = ["CellDisplay"]

# Seconds between view refreshes: elapsed time and cost, and whatever the view's 10 Hz throttle held back (a
# progress update right after an output line). Cheap: a refresh sends only the widget traits that changed.
_TICK = 0.2


class CellDisplay:
    def __init__(self, job: Job, shell: Any | None) -> None:
        from .widgets import JobView

        self.job = job
        self.kernel = getattr(shell, "kernel", None)
        self.parent = shell.get_parent() if shell is not None and self.kernel is not None else None
        self.view: JobView = JobView(job_id=job.id, name=job.spec.name, max_cost_usd=job.plan.cap_usd)
        self._handle: Any = None
        self._last_stream: str | None = None

    @property
    def text_mode(self) -> bool:
        return self.kernel is None

    def show(self) -> None:
        if self.text_mode:
            return
        from IPython.display import display

        self._handle = display(self.view, display_id=True)  # type: ignore[no-untyped-call]

    # -- blocking ---------------------------------------------------------------------------------------------

    def run_blocking(self) -> JobResult:
        """Pump events on this (main) thread until the job ends. Ctrl-C cancels the job, waits for its clean-up
        (sync back, terminate, settle), then raises KeyboardInterrupt."""
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
                        sys.stderr.write(f"burst: job {self.job.id} is still being cleaned up in the background\n")
                        raise
                    interrupted = True
                    sys.stderr.write("burst: cancelling: syncing back, terminating, settling the bill "
                                     "(Ctrl-C again to leave that to the background)\n")
                    self.job.cancel()
        finally:
            remove()
        result = self.job.result()
        if interrupted:
            raise KeyboardInterrupt
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
        """Render from the session loop thread from now on (the view's single writer)."""
        self.job.add_listener(lambda e: self._on_event(e, blocking=False))
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
            self.view.handle(event)
            return
        self.view.handle(event)
        if self.text_mode:
            line = self.view.text_line(event)
            if line:
                self._write("stdout", f"[burst] {line}\n", blocking=blocking)
        if event.is_final:
            self._refresh_snapshot()
            if not blocking:
                self._report_background_end()
        elif event.type is EventType.STARTED:
            self._refresh_snapshot()

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

    def _refresh_snapshot(self) -> None:
        """Re-publish the displayed view at the job's turning points, so the text/plain and text/html kept in the
        notebook say how it ended (nbconvert and nbclient keep the last update). Only then: a re-publish makes
        JupyterLab rebuild the widget's view, and the live widget updates itself over its comm anyway."""
        if self._handle is not None and threading.current_thread() is threading.main_thread():
            self._handle.update(self.view)

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
