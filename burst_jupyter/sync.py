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

from .errors import ConfigError, SyncError, UnsafeResults
from .ignore import iter_entries
from .spec import Mount

if TYPE_CHECKING:
    from .sinks import ResultSink

__all__ = ["MountPlan", "Received", "plan_mounts", "receive_results", "write_bundle"]

_VALUES = "values.out.pkl"  # the pulled variables, beside m/<i>/ in the results tar (agent.results_main)


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


def plan_mounts(mounts: list[Mount], *, cwd: Path | None = None, create: bool = True) -> list[MountPlan]:
    """Resolve local paths; a missing one is a :class:`ConfigError` before anything is rented. A missing rw
    folder whose parent exists is made (``create``), or only allowed (a dry run writes nothing)."""
    base = cwd or Path.cwd()
    plans = []
    for i, m in enumerate(mounts):
        local = (base / m.local).resolve() if not m.local.is_absolute() else m.local.resolve()
        if not local.exists():
            if m.mode == "rw" and local.parent.is_dir():
                if create:
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
    into ``sink`` as ``<mount name>/<path>``. A sink failure never costs a local file: it becomes ``sink_note``.

    The instance is not trusted (whoever owns a rented machine can write anything there). A member must be
    ``values.out.pkl`` or ``m/<i>/<path>`` of an rw mount, and a file, folder, symlink or hardlink that lands inside
    that mount's folder. Anything else (``..``, an absolute name, a link pointing out, a path leading out through a
    link, a device file or FIFO, any other name) is written nowhere: the rest of the transfer still lands,
    then one :class:`SyncError` names what was refused.
    """
    mounts = {str(p.index): p for p in plans if p.rw}
    got = Received()
    feed = _SinkFeed(sink, got) if sink is not None else None
    refused: list[str] = []
    links: list[tuple[Path, Path, str]] = []  # (mount root, symlink made, member name)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                try:
                    _receive(tar, member, mounts, got, feed, links)
                except _Refused as exc:
                    refused.append(str(exc))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SyncError(f"results transfer broke off: {exc}") from exc
    # Each link pointed inside when it was made, but a later member may have re-pointed a link it goes through
    # (b -> sub/deeper, a -> b/.., then b -> .): look again now that every member is in place.
    for root, link, name in links:
        if link.is_symlink() and not _inside(root, Path(os.path.realpath(link))):
            refused.append(f"{name!r} -> {os.readlink(link)!r}: a link that ends up pointing outside its mount")
            link.unlink()
            got.files = [f for f in got.files if f != link]
    if feed is not None:
        feed.finish()
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise UnsafeResults(f"refused a result from the instance: {refused[0]}{more}; nothing was written outside "
                        "the rw mounts")
    return got


class _Refused(Exception):
    """A results member that must not be written; the message names it."""


def _receive(tar: tarfile.TarFile, member: tarfile.TarInfo, mounts: Mapping[str, MountPlan], got: Received,
             feed: _SinkFeed | None, links: list[tuple[Path, Path, str]]) -> None:
    name = member.name
    if name == _VALUES:
        if not member.isfile():
            raise _Refused(f"{name!r}: not a regular file")
        f = tar.extractfile(member)
        got.values_blob = f.read() if f else None
        return
    plan, root, dest, rel = _landing(name, mounts)
    note: str | None = None
    if plan.is_file and (dest != plan.local or not member.isfile()):
        raise _Refused(f"{name!r}: a file mount takes back only its one file")
    if member.issym():
        _make_link(member, root, dest, got)
        links.append((root, dest, name))
        return
    if member.isdir():
        if dest.is_dir():
            return  # already there (or a link to a folder inside the mount)
        if dest.exists() or dest.is_symlink():
            got.notes.append(f"skipped {name!r}: a file of that name exists locally")
        else:
            dest.mkdir(parents=True)
        return
    if member.islnk():
        # Names an earlier member of this archive: it lands as a copy of the file that member wrote.
        try:
            source: Path | None = _landing(member.linkname, mounts)[2]
        except _Refused:
            source = None
        if source is None or source not in got.files or source.is_symlink() or not source.is_file():
            raise _Refused(f"{name!r}: a hardlink to {member.linkname!r}, which is no file of these results")
        with source.open("rb") as copy:
            note = _write(dest, copy, member, got)
    elif member.isfile():
        data = tar.extractfile(member)
        if data is None:
            return
        note = _write(dest, data, member, got)
    else:
        raise _Refused(f"{name!r}: not a regular file, folder or link")
    if note is not None:
        got.notes.append(note)
    elif feed is not None:
        feed.put(f"{_sink_name(plan)}/{rel}", dest)


def _landing(name: str, mounts: Mapping[str, MountPlan]) -> tuple[MountPlan, Path, Path, str]:
    """(mount, its real local root, the local path, the clean relative path) for ``m/<i>/<path>``, else
    :class:`_Refused`. The local path is the real parent folder plus the last name: a local link on the way is
    followed here, once, and must keep the path inside the mount; the last name is replaced, never followed."""
    if name.startswith("/"):
        raise _Refused(f"{name!r}: an absolute path")
    parts = name.split("/")
    rel = [part for part in parts[2:] if part not in ("", ".")]
    if parts[0] != "m" or len(parts) < 3 or parts[1] not in mounts or not rel:
        raise _Refused(f"{name!r}: not a path in an rw mount")
    if ".." in rel:
        raise _Refused(f"{name!r}: a path that escapes its mount")
    plan = mounts[parts[1]]
    root = Path(os.path.realpath(plan.local.parent if plan.is_file else plan.local))
    parent = Path(os.path.realpath(root.joinpath(*rel[:-1])))
    if not _inside(root, parent):
        raise _Refused(f"{name!r}: its folder leads outside its mount through a link")
    return plan, root, parent / rel[-1], "/".join(rel)


def _make_link(member: tarfile.TarInfo, root: Path, dest: Path, got: Received) -> None:
    target = Path(os.path.realpath(dest.parent / member.linkname))
    if os.path.isabs(member.linkname) or not _inside(root, target):
        raise _Refused(f"{member.name!r} -> {member.linkname!r}: a link pointing outside its mount")
    if dest.is_dir() and not dest.is_symlink():
        got.notes.append(f"skipped {member.name!r}: a folder of that name exists locally")
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    os.symlink(member.linkname, dest)
    got.files.append(dest)


def _write(dest: Path, content: IO[bytes], member: tarfile.TarInfo, got: Received) -> str | None:
    """``content`` as the file at ``dest``, replacing a file or link there in one rename; a note when skipped."""
    if dest.is_dir() and not dest.is_symlink():
        return f"skipped {member.name!r}: a folder of that name exists locally"
    with replace_atomically(dest) as tmp:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(content, out, 1 << 20)
        os.chmod(tmp, member.mode & 0o777 or 0o644)  # never setuid/setgid/sticky bits from the instance
        os.utime(tmp, (member.mtime, member.mtime))
    got.files.append(dest)
    return None


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
