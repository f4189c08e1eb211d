"""The results coming back: the files a cell changed in its rw mounts, and its pulled values.

Results are only the files the cell changed in rw mounts (the agent compares against what it unpacked); they
are written atomically, nothing may land outside its mount (no absolute paths, no ``..``, no links pointing
out), into ``.git`` or into a path the upload left out, and a file edited here since the upload (sync.py's
record) is never replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .errors import ResultsTooLarge, SyncError, UnsafeResults
from .ignore import NEVER_SYNCED, excluded
from .processes import pid_alive
from .sync import MountPlan, file_digest, file_signature, unchanged_since
from .variables import pull_limit

if TYPE_CHECKING:
    from .sinks import ResultSink

__all__ = ["SCRATCH", "Received", "conflict_name", "format_bytes", "receive_results", "replace_atomically", "sweep",
           "sweep_scratch"]

_VALUES = "values.out.pkl"  # the pulled variables, beside m/<i>/ in the results tar (agent.results_main)


@dataclass
class Received:
    values_blob: bytes | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stored: int = 0  # files also stored in the result sink
    sink_note: str | None = None  # why some files are not in the sink (also in ``notes``)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (the user's file, kept; the instance's copy)
    refused: list[str] = field(default_factory=list)  # results written nowhere: into .git or an excluded path
    unwritten: list[str] = field(default_factory=list)  # results this machine could not write (disk full, ...)
    write_error: str | None = None  # why (the first local error)
    over_limit: str | None = None  # what the results limit kept out
    bytes: int = 0  # file bytes taken in

    def missing(self) -> str | None:
        """What did not come back and why, in one line (the job view and the ledger say it); None: nothing."""
        parts = []
        if self.unwritten:
            parts.append(f"{', '.join(self.unwritten)} (could not be written here: {self.write_error})")
        if self.over_limit:
            parts.append(self.over_limit)
        return "; ".join(parts) or None


def receive_results(stream: IO[bytes], plans: list[MountPlan], *, sink: ResultSink | None = None,
                    job_id: str = "", max_bytes: int | None = None) -> Received:
    """Unpack the agent's results tar: rw-mount changes into their local folders, and each file, as it lands,
    into ``sink`` as ``<mount name>/<path>``. A sink failure never costs a local file: it becomes ``sink_note``.

    The instance is not trusted (whoever owns a rented machine can write anything there). A member must be
    ``values.out.pkl`` or ``m/<i>/<path>`` of an rw mount, and a file, folder, symlink or hardlink that lands inside
    that mount's folder. Anything else (``..``, an absolute name, a link pointing out, a path leading out through a
    link, a device file or FIFO, any other name) is written nowhere: the rest of the transfer still lands,
    then one :class:`UnsafeResults` names what was refused.

    Nothing of the user's is replaced unnoticed: a file changed (or deleted, or created) here since the upload
    stays as it is, and the instance's version lands beside it as ``NAME.burst-conflict-JOBID.EXT``
    (``Received.conflicts``). Nothing is written into ``.git`` or into a path the upload excluded
    (``Received.refused``), and a new file never gets execute bits. A local write error (a full disk) is not a
    broken transfer: the rest is still read, and ``Received.unwritten`` names what is missing. Past ``max_bytes``
    of files the transfer stops: :class:`ResultsTooLarge`, carrying what landed.
    """
    mounts = {str(p.index): p for p in plans if p.rw}
    sweep_scratch(plans)
    got = Received()
    feed = _SinkFeed(sink, got) if sink is not None else None
    refused: list[str] = []
    links: list[tuple[Path, Path, str]] = []  # (mount root, symlink made, member name)
    context = _Context(mounts, got, feed, links, job_id or "job", max_bytes)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                try:
                    _receive(tar, member, context)
                except _Refused as exc:
                    refused.append(str(exc))
                except _Skipped as exc:
                    got.refused.append(str(exc))
                    got.notes.append(f"refused {exc}")
                except _TooMuch as exc:
                    got.over_limit = str(exc)
                    got.notes.append(f"not brought back: {exc}")
                    break
    except _BrokeOff as exc:
        raise SyncError(f"results transfer broke off: {exc.__cause__}") from exc.__cause__
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SyncError(f"results transfer broke off: {exc}") from exc
    finally:
        sweep_scratch(plans)
    # Each link pointed inside when it was made, but a later member may have re-pointed a link it goes through
    # (b -> sub/deeper, a -> b/.., then b -> .): look again now that every member is in place.
    for root, link, name in links:
        if link.is_symlink() and not _inside(root, Path(os.path.realpath(link))):
            refused.append(f"{name!r} -> {os.readlink(link)!r}: a link that ends up pointing outside its mount")
            link.unlink()
            got.files = [f for f in got.files if f != link]
    if feed is not None:
        feed.finish()
    if got.unwritten:
        got.notes.append(f"not brought back: {got.missing()}")
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise UnsafeResults(f"refused a result from the instance: {refused[0]}{more}; nothing was written outside "
                            "the rw mounts")
    if got.over_limit is not None:
        raise ResultsTooLarge(f"results over the limit: not brought back: {got.over_limit}", got)
    return got


class _Refused(Exception):
    """A results member that must not be written; the message names it."""


class _Skipped(Exception):
    """A results member burst will not write (into .git, into an excluded path); reported, the job goes on."""


class _TooMuch(Exception):
    """The results limit is reached: the message says what was kept out."""


class _BrokeOff(Exception):
    """Reading the results stream failed (the cause): a transport failure, unlike a local write error."""


@dataclass
class _Context:
    mounts: Mapping[str, MountPlan]
    got: Received
    feed: _SinkFeed | None
    links: list[tuple[Path, Path, str]]
    job_id: str
    max_bytes: int | None


def _receive(tar: tarfile.TarFile, member: tarfile.TarInfo, cx: _Context) -> None:
    name, got = member.name, cx.got
    if name == _VALUES:
        if not member.isfile():
            raise _Refused(f"{name!r}: not a regular file")
        limit = pull_limit()
        if member.size > limit:  # skipped, never read into memory
            raise _Refused(f"{name!r}: {member.size} bytes of pulled values, over the limit of {limit} "
                           "(BURST_PULL_BYTES)")
        f = tar.extractfile(member)
        got.values_blob = f.read(member.size) if f else None
        return
    plan, root, dest, rel = _landing(name, cx.mounts, is_dir=member.isdir())
    if plan.is_file and (dest != plan.local or not member.isfile()):
        raise _Refused(f"{name!r}: a file mount takes back only its one file")
    key = plan.local.name if plan.is_file else rel
    try:
        if member.issym():
            target, why = _destination(plan, key, dest, cx.job_id)
            link = _make_link(member, root, target, got)
            if link is not None and why is not None:
                _settle_conflict(plan, key, dest, link, why, None, got)
            if link is not None:
                cx.links.append((root, link, name))
                if link == dest and plan.uploaded is not None:
                    plan.uploaded[key] = file_signature(link)  # type: ignore[assignment]
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
                source: Path | None = _landing(member.linkname, cx.mounts)[2]
            except (_Refused, _Skipped):
                source = None
            if source is None or source not in got.files or source.is_symlink() or not source.is_file():
                raise _Refused(f"{name!r}: a hardlink to {member.linkname!r}, which is no file of these results")
            size = source.stat().st_size
            _count(cx, plan.shown(rel), size)
            with source.open("rb") as copy:
                target, why = _destination(plan, key, dest, cx.job_id)
                written = _write(target, copy, member, root, got)
        elif member.isfile():
            _count(cx, plan.shown(rel), member.size)
            data = tar.extractfile(member)
            if data is None:
                return
            target, why = _destination(plan, key, dest, cx.job_id)
            written = _write(target, data, member, root, got)
        else:
            raise _Refused(f"{name!r}: not a regular file, folder or link")
        if written is None:
            return
        path, digest = written
        if why is not None:
            path = _settle_conflict(plan, key, dest, path, why, digest, got)
        if path == dest and plan.uploaded is not None:
            # What is here now is the instance's, as this transfer left it: a later transfer may replace it.
            st = os.stat(dest)
            plan.uploaded[key] = [st.st_size, st.st_mtime_ns, digest]
    except OSError as exc:  # writing here failed (reading the stream raises _BrokeOff): name it, go on
        got.unwritten.append(plan.shown(rel))
        got.write_error = got.write_error or exc.strerror or str(exc)
        return
    if cx.feed is not None:
        cx.feed.put(f"{_sink_name(plan)}/{rel}", path)


def _count(cx: _Context, shown: str, size: int) -> None:
    cx.got.bytes += size
    if cx.max_bytes is not None and cx.got.bytes > cx.max_bytes:
        raise _TooMuch(f"{shown} ({size} bytes) and any results after it, past the {format_bytes(cx.max_bytes)} "
                       "limit (raise it with --max-results)")


def _destination(plan: MountPlan, key: str, dest: Path, job_id: str) -> tuple[Path, str | None]:
    """Where a result for ``dest`` lands: ``dest`` itself when the local file is still the one uploaded (or there
    is none, and none was uploaded); otherwise the user's file stays and the instance's version goes beside it,
    and the second value says why."""
    recorded = plan.uploaded.get(key) if plan.uploaded is not None else None
    present = os.path.lexists(dest)
    if recorded is None and not present:
        return dest, None
    if recorded is not None and present and unchanged_since(dest, recorded):
        return dest, None
    why = ("already here" if plan.uploaded is None else  # no record: every file here counts as the user's
           "created here since the upload" if recorded is None else
           "deleted here since the upload" if not present else "changed here since the upload")
    return conflict_name(dest, job_id), why


def _settle_conflict(plan: MountPlan, key: str, dest: Path, copy: Path, why: str, digest: str | None,
                     got: Received) -> Path:
    """The instance's version went to ``copy``. The same bytes as the local file are no conflict (a killed sync
    had written it already): the copy goes. Otherwise both are named. Returns where the result now is."""
    if digest is not None and dest.is_file() and not dest.is_symlink() and file_digest(dest) == digest:
        copy.unlink()
        got.files[got.files.index(copy)] = dest
        return dest
    got.conflicts.append((plan.shown(key), str(copy)))
    got.notes.append(f"{plan.shown(key)} was {why}: kept as it is; the instance's version is in {copy}")
    return copy


def conflict_name(dest: Path, job_id: str) -> Path:
    """``results.csv`` -> ``results.burst-conflict-JOBID.csv``: the instance's version beside the user's file."""
    return dest.with_name(f"{dest.stem}.burst-conflict-{job_id}{dest.suffix}")


def format_bytes(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


def _landing(name: str, mounts: Mapping[str, MountPlan], *, is_dir: bool = False) -> tuple[MountPlan, Path, Path, str]:
    """(mount, its real local root, the local path, the clean relative path) for ``m/<i>/<path>``, else
    :class:`_Refused` (an escape) or :class:`_Skipped` (``.git``, a path the upload excluded). The local path is
    the real parent folder plus the last name: a local link on the way is followed here, once, and must keep the
    path inside the mount; the last name is replaced, never followed."""
    if name.startswith("/"):
        raise _Refused(f"{name!r}: an absolute path")
    parts = name.split("/")
    rel = [part for part in parts[2:] if part not in ("", ".")]
    if parts[0] != "m" or len(parts) < 3 or parts[1] not in mounts or not rel:
        raise _Refused(f"{name!r}: not a path in an rw mount")
    if ".." in rel:
        raise _Refused(f"{name!r}: a path that escapes its mount")
    plan = mounts[parts[1]]
    root = plan.root
    parent = Path(os.path.realpath(root.joinpath(*rel[:-1])))
    if not _inside(root, parent):
        raise _Refused(f"{name!r}: its folder leads outside its mount through a link")
    real = "/".join([*parent.relative_to(root).parts, rel[-1]])
    if not plan.is_file:
        for path in {"/".join(rel), real}:
            if excluded(plan.rules, path, is_dir=is_dir):
                raise _Skipped(f"{plan.shown(path)}: the upload left this path out (.git, .gitignore, "
                               ".burstignore), so results may not add to it")
    return plan, root, parent / rel[-1], "/".join(rel)


def _make_link(member: tarfile.TarInfo, root: Path, dest: Path, got: Received) -> Path | None:
    target = Path(os.path.realpath(dest.parent / member.linkname))
    if os.path.isabs(member.linkname) or not _inside(root, target):
        raise _Refused(f"{member.name!r} -> {member.linkname!r}: a link pointing outside its mount")
    if any(part.lower() in NEVER_SYNCED for part in target.relative_to(root).parts):
        raise _Skipped(f"{member.name!r} -> {member.linkname!r}: a link into .git")
    if dest.is_dir() and not dest.is_symlink():
        got.notes.append(f"skipped {member.name!r}: a folder of that name exists locally")
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    os.symlink(member.linkname, dest)
    got.files.append(dest)
    return dest


def _write(dest: Path, content: IO[bytes], member: tarfile.TarInfo, root: Path,
           got: Received) -> tuple[Path, str] | None:
    """``content`` as the file at ``dest``, replacing a file or link there in one rename: ``(dest, its sha256)``,
    or None when skipped.

    Execute bits come only from the local file it replaces: an instance cannot make a file executable here."""
    try:
        local = os.lstat(dest).st_mode
    except (FileNotFoundError, NotADirectoryError):
        local = 0
    if stat.S_ISDIR(local):
        got.notes.append(f"skipped {member.name!r}: a folder of that name exists locally")
        return None
    local_exec = local & 0o111 if stat.S_ISREG(local) else 0
    digest = hashlib.sha256()
    with replace_atomically(dest, scratch=root / SCRATCH) as tmp:
        with open(tmp, "wb") as out:
            while True:
                try:
                    chunk = content.read(1 << 20)
                except (tarfile.TarError, EOFError, OSError) as exc:
                    raise _BrokeOff() from exc
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
        # Never setuid/setgid/sticky bits, and execute bits only where the user's own file had them.
        os.chmod(tmp, (member.mode & 0o666 or 0o644) | (member.mode & local_exec))
        os.utime(tmp, (member.mtime, member.mtime))
    got.files.append(dest)
    return dest, digest.hexdigest()


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


#: The folder, at the top of each rw mount, that results are written through before their one rename.
SCRATCH = ".burst-tmp"


@contextlib.contextmanager
def replace_atomically(dest: Path, *, scratch: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to fill; on success it replaces ``dest`` in one rename.

    A result is either the old file or the whole new one, never half of it; a failure leaves no temporary file.
    With ``scratch`` (on ``dest``'s disk) the temporary file lives there, named by this process, so that one left
    by a process killed mid-write is found and removed by :func:`sweep_scratch`; otherwise it lives beside ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    where, prefix = dest.parent, f".{dest.name}."
    if scratch is not None:
        scratch.mkdir(mode=0o700, exist_ok=True)
        if scratch.stat().st_dev == dest.parent.stat().st_dev:  # a rename cannot cross disks
            where, prefix = scratch, f"{os.getpid()}."
    fd, name = tempfile.mkstemp(dir=where, prefix=prefix, suffix=".burst-tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
        if where != dest.parent:
            with contextlib.suppress(OSError):
                where.rmdir()  # only once empty: no folder of ours stays behind in the user's


def sweep_scratch(plans: list[MountPlan]) -> None:
    """Remove what a killed sync left in the rw mounts' scratch folders, and each folder once it is empty."""
    for plan in plans:
        if plan.rw:
            sweep(plan.root / SCRATCH)


def sweep(scratch: Path) -> None:
    """Remove the temporary files of processes no longer alive from ``scratch``, and the folder once empty."""
    try:
        names = os.listdir(scratch)
    except OSError:
        return
    for name in names:
        pid = name.partition(".")[0]
        if not (pid.isdigit() and pid_alive(int(pid))):
            with contextlib.suppress(OSError):
                os.unlink(scratch / name)
    with contextlib.suppress(OSError):
        scratch.rmdir()

