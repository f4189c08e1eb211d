"""Each job's events, one JSON line each, in ``<burst home>/logs/jobs/<job_id>.jsonl``: ``burst show`` reads a
job from any process (the kernel that started it, another terminal, after a restart).

The session attaches a :class:`JobLogWriter` to every job it starts. Events carry no secrets (no keys, no
tokens): the job's own output, prices, provider and instance names.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import IO

from .events import EventType, JobEvent
from .limits import env_limit
from .paths import burst_home, open_private, private_dir

__all__ = ["JobLogWriter", "job_log_path", "known_job_ids", "log_limit", "read_events", "valid_job_id"]

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def valid_job_id(job_id: str) -> bool:
    """A session-made id (``<slug>-<hex>``): safe as a file name. Anything else is no job of ours."""
    return _JOB_ID.fullmatch(job_id) is not None


def _jobs_dir(home: Path | None) -> Path:
    return (home or burst_home()) / "logs" / "jobs"


def job_log_path(job_id: str, home: Path | None = None) -> Path:
    if not valid_job_id(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return _jobs_dir(home) / f"{job_id}.jsonl"


def log_limit() -> int:
    """The most bytes of a job's output a log on disk keeps: ``BURST_LOG_BYTES`` (default 64 MiB). The event log
    and the whole-output file (output.py) each stop there."""
    return env_limit("BURST_LOG_BYTES", 64 << 20)


class JobLogWriter:
    """A Job listener (``job.add_listener(JobLogWriter(job.id, home))``): appends each event, flushed per line.

    It never raises into the job: the first write that fails is logged and the log stops there. Past
    ``BURST_LOG_BYTES`` (default 64 MiB) it keeps only the job's turning points, not its output or progress: a
    flood cannot fill the disk (the output has its own capped file, output.py).
    """

    def __init__(self, job_id: str, home: Path | None = None) -> None:
        self.path = job_log_path(job_id, home)
        self._file: IO[str] | None = None
        self._broken = False
        self._room = log_limit()

    def __call__(self, event: JobEvent) -> None:
        if self._broken:
            return
        try:
            line = json.dumps(event.to_json(), ensure_ascii=False) + "\n"
            if event.type in (EventType.OUTPUT, EventType.DISPLAY, EventType.PROGRESS):
                if len(line) > self._room:
                    return
                self._room -= len(line)
            if self._file is None:
                private_dir(self.path.parent)
                self._file = open_private(self.path, "a", encoding="utf-8")  # closed at the final event
            self._file.write(line)
            self._file.flush()
            if event.is_final:
                self.close()
        except (OSError, TypeError, ValueError) as exc:
            self._broken = True
            self.close()
            log.warning("job log %s: %s; no more events are written there", self.path, exc)

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass


def read_events(job_id: str, home: Path | None = None) -> list[JobEvent] | None:
    """The job's logged events, oldest first; ``None`` when there is no log for it. A line cut short (the writer
    is mid-write, or died there) is skipped."""
    try:
        text = job_log_path(job_id, home).read_text(encoding="utf-8")
    except (FileNotFoundError, ValueError):
        return None
    events = []
    for line in text.splitlines():
        try:
            events.append(JobEvent.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue
    return events


def known_job_ids(home: Path | None = None) -> list[str]:
    """Every job with a log, newest first."""
    folder = _jobs_dir(home)
    if not folder.is_dir():
        return []
    logs = sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.stem for p in logs]
