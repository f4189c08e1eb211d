"""Moving files: the upload bundle (mounts, cell, pushed variables) and the results coming back.

Uploads honour .gitignore and .burstignore (ignore.py). Results are only the files the cell changed in rw
mounts (the agent compares against what it unpacked); they are written atomically, and nothing may land
outside its mount (no absolute paths, no ``..``, no links pointing out).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import ConfigError, SyncError
from .ignore import iter_entries
from .spec import Mount

if TYPE_CHECKING:
    from .sinks import ResultSink

__all__ = ["MountPlan", "Received", "plan_mounts", "receive_results", "write_bundle"]


@dataclass(frozen=True, slots=True)
class MountPlan:
    index: int
    mount: Mount
    local: Path  # absolute
    is_file: bool

    @property
    def rw(self) -> bool:
        return self.mount.mode == "rw"

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "mount": self.mount.model_dump(mode="json"), "local": str(self.local),
                "is_file": self.is_file}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountPlan:
        return cls(data["index"], Mount.model_validate(data["mount"]), Path(data["local"]), data["is_file"])

    def manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"remote": self.mount.remote, "mode": self.mount.mode}
        if self.is_file:
            entry["file"] = self.local.name
        return entry


def plan_mounts(mounts: list[Mount], *, cwd: Path | None = None) -> list[MountPlan]:
    """Resolve local paths; a missing one is a :class:`ConfigError` before anything is rented."""
    base = cwd or Path.cwd()
    plans = []
    for i, m in enumerate(mounts):
        local = (base / m.local).resolve() if not m.local.is_absolute() else m.local.resolve()
        if not local.exists():
            if m.mode == "rw" and local.parent.is_dir():
                local.mkdir()  # an output folder the cell will fill: create it, as `mkdir -p out` would
            else:
                raise ConfigError(f"--mount {m}: local path {m.local} does not exist")
        plans.append(MountPlan(i, m, local, local.is_file()))
    return plans


def write_bundle(
    sink: IO[bytes],
    plans: list[MountPlan],
    *,
    cell: str | None,
    pushed: Mapping[str, bytes],
    compress: bool,
) -> list[str]:
    """Write the upload tar to ``sink``. Returns notes on what was left out (symlinks to folders)."""
    notes: list[str] = []
    # gzip level 1: cheap on the CPU, and most of what crosses a WAN link (code, CSV, JSON) shrinks a lot.
    out: IO[bytes] | gzip.GzipFile = (
        gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=1, mtime=0) if compress else sink)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        if cell is not None:
            _add_bytes(tar, "cell.py", cell.encode("utf-8"))
        _add_bytes(tar, "values.pkl", pickle.dumps(dict(pushed), protocol=4))
        for plan in plans:
            prefix = f"m/{plan.index}"
            if plan.is_file:
                tar.add(plan.local, arcname=f"{prefix}/{plan.local.name}", recursive=False)
                continue
            for entry in iter_entries(plan.local):
                arcname = f"{prefix}/{entry.rel}"
                if entry.is_symlink:
                    target = entry.path.resolve()
                    if target.is_file():
                        # Links are uploaded as the content they point to: the instance has no such target.
                        with target.open("rb") as content:
                            tar.addfile(tar.gettarinfo(str(target), arcname=arcname), content)
                    else:
                        notes.append(f"{plan.mount.local}/{entry.rel}: symlink to a folder left out")
                    continue
                tar.add(entry.path, arcname=arcname, recursive=False)
    if compress:
        out.close()  # writes the gzip trailer; the sink itself stays open
    return notes


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


@dataclass
class Received:
    values_blob: bytes | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stored: int = 0  # files also stored in the result sink
    sink_note: str | None = None  # why some files are not in the sink (also in ``notes``)


def receive_results(stream: IO[bytes], plans: list[MountPlan], *, sink: ResultSink | None = None) -> Received:
    """Unpack the agent's results tar: rw-mount changes into their local folders, and each file, as it lands,
    into ``sink`` as ``<mount name>/<path>``. A sink failure never costs a local file: it becomes ``sink_note``."""
    by_index = {str(p.index): p for p in plans if p.rw}
    got = Received()
    feed = _SinkFeed(sink, got) if sink is not None else None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.name == "values.out.pkl":
                    f = tar.extractfile(member)
                    got.values_blob = f.read() if f else None
                    continue
                parts = member.name.split("/")
                if len(parts) < 3 or parts[0] != "m" or parts[1] not in by_index:
                    got.notes.append(f"unexpected entry in results: {member.name}")
                    continue
                plan = by_index[parts[1]]
                rel = "/".join(parts[2:])
                root = plan.local.parent if plan.is_file else plan.local
                if plan.is_file and rel != plan.local.name:
                    continue
                note = _place(tar, member, root, rel, got)
                if note:
                    got.notes.append(note)
                elif feed is not None and member.isfile():
                    feed.put(f"{_sink_name(plan)}/{rel}", root / rel)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SyncError(f"results transfer broke off: {exc}") from exc
    if feed is not None:
        feed.finish()
    return got


class _SinkFeed:
    """Feeds one results transfer into a sink. The first failure stops it: a sink that refused one file (gone
    bucket, expired credentials, dead network) almost always refuses the rest, and retrying each one would hold
    the transfer for minutes. What was not stored is reported once, in ``Received.sink_note``."""

    def __init__(self, sink: ResultSink, got: Received) -> None:
        self.sink, self.got = sink, got
        self.failure: str | None = None
        self.missed = 0

    def put(self, key: str, path: Path) -> None:
        if self.failure is None:
            try:
                self.sink.put(key, path)
                self.got.stored += 1
                return
            except Exception as exc:  # any failure: the local file is safe, so report it and go on
                self.failure = str(exc) or type(exc).__name__
        self.missed += 1

    def finish(self) -> None:
        if self.failure is None:
            return
        more = f" ({self.missed - 1} more file(s) not stored either)" if self.missed > 1 else ""
        self.got.sink_note = f"{self.failure}{more}; the results are in the local folder"
        self.got.notes.append(self.got.sink_note)


def _sink_name(plan: MountPlan) -> str:
    return plan.mount.remote.strip("/~").replace("/", "_") or f"mount{plan.index}"


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def _place(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, rel: str, got: Received) -> str | None:
    """Write one member under root. Refuses anything that would land outside it."""
    if rel.startswith("/") or ".." in rel.split("/"):
        return f"refused {rel!r}: path escapes its mount"
    root = root.resolve()
    dest = root / rel
    if not _inside(root, dest.parent.resolve() if dest.parent.exists() else dest.parent):
        return f"refused {rel!r}: path escapes its mount"
    if member.isdir():
        dest.mkdir(parents=True, exist_ok=True)
        return None
    if member.issym():
        target = (dest.parent / member.linkname).resolve()
        if os.path.isabs(member.linkname) or not _inside(root, target):
            return f"refused link {rel!r} -> {member.linkname!r}: it points outside its mount"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        os.symlink(member.linkname, dest)
        got.files.append(dest)
        return None
    if not member.isfile():
        return f"skipped {rel!r}: not a regular file"
    src = tar.extractfile(member)
    if src is None:
        return None
    if dest.is_dir() and not dest.is_symlink():
        return f"skipped {rel!r}: a folder of that name exists locally"
    with replace_atomically(dest) as tmp:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(tmp, member.mode & 0o777 or 0o644)
        os.utime(tmp, (member.mtime, member.mtime))
    got.files.append(dest)
    return None


@contextlib.contextmanager
def replace_atomically(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` to fill; on success it replaces ``dest`` in one rename.

    A result is either the old file or the whole new one, never half of it; a failure leaves no temporary file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".burst-tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
