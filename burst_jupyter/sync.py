"""The upload: the bundle a job sends (its mounts, its cell, pushed variables) and the record of what it sent.

Uploads honour .gitignore and .burstignore (ignore.py) and record each file they sent (``MountPlan.uploaded``:
size, mtime, SHA-256) with the ignore rules they applied (``MountPlan.rules``), so that the results coming back
(sync_back.py) never replace a file edited here since, nor land where the upload left out.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import stat
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError
from .ignore import iter_entries
from .spec import Mount

__all__ = ["MountPlan", "Signature", "file_digest", "file_signature", "plan_mounts", "unchanged_since",
           "write_bundle"]


#: A file as uploaded (or as last synced back): ``[size, mtime_ns, sha256]``; a link's digest is ``link:TARGET``.
Signature = list[Any]


@dataclass(slots=True)
class MountPlan:
    index: int
    mount: Mount
    local: Path  # absolute
    is_file: bool
    # Filled by write_bundle, kept up to date by receive_results, and carried to a reaper in the handoff: each
    # file as uploaded, so a local edit made since is told from the file the instance started from. None: no
    # record (never uploaded by this version), so every file already here counts as the user's.
    uploaded: dict[str, Signature] | None = None
    rules: dict[str, str] = field(default_factory=dict)  # the ignore files the upload obeyed (ignore.excluded)
    # On a kept machine (``%burst up``): the store this mount keeps there across cells, and each file as it last
    # reached that store (as uploaded or as synced back). A file still as recorded is not sent again.
    keep: str | None = None
    sent: dict[str, Signature] | None = None

    @property
    def rw(self) -> bool:
        return self.mount.mode == "rw"

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "mount": self.mount.model_dump(mode="json"), "local": str(self.local),
                "is_file": self.is_file, "uploaded": None if self.uploaded is None else dict(self.uploaded),
                "rules": dict(self.rules)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountPlan:
        return cls(data["index"], Mount.model_validate(data["mount"]), Path(data["local"]), data["is_file"],
                   data.get("uploaded"), data.get("rules") or {})

    def manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"remote": self.mount.remote, "mode": self.mount.mode}
        if self.is_file:
            entry["file"] = self.local.name
        if self.keep is not None:
            # What the store must hold once this upload is in: a file deleted here is deleted there.
            entry.update(keep=self.keep, present=sorted(self._listing()))
        return entry

    def _listing(self) -> list[str]:
        """The files an upload of this mount sends (ignore rules applied), as paths below it."""
        if self.is_file:
            return [self.local.name]
        return [e.rel for e in iter_entries(self.local) if not e.is_dir and (not e.is_symlink or e.path.is_file())]

    def unchanged(self, rel: str, path: Path) -> Signature | None:
        """The signature this file last reached the kept machine with, when it is still that file (size and
        mtime): not sent again. None: send it."""
        recorded = (self.sent or {}).get(rel)
        now = file_signature(path) if recorded is not None else None
        return recorded if now is not None and recorded is not None and now[:2] == recorded[:2] else None

    @property
    def root(self) -> Path:
        """The real local folder results land in (a file mount's folder)."""
        return Path(os.path.realpath(self.local.parent if self.is_file else self.local))

    def shown(self, rel: str) -> str:
        """A result's path as the user wrote the mount, for notes: ``out/model.pt``."""
        return str(self.mount.local) if self.is_file else f"{self.mount.local}/{rel}"


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
            plan.uploaded, plan.rules = {}, {}
            if plan.is_file:
                name = plan.local.name
                plan.uploaded[name] = plan.unchanged(name, plan.local) or _add_file(tar, plan.local, f"{prefix}/{name}")
                continue
            for entry in iter_entries(plan.local, rules_read=plan.rules):
                arcname = f"{prefix}/{entry.rel}"
                if entry.is_dir:
                    tar.add(entry.path, arcname=arcname, recursive=False)
                elif (kept := plan.unchanged(entry.rel, entry.path)) is not None:
                    plan.uploaded[entry.rel] = kept  # already on the kept machine, as it is here
                elif not entry.is_symlink:
                    plan.uploaded[entry.rel] = _add_file(tar, entry.path, arcname)
                elif (target := entry.path.resolve()).is_file():
                    # Links are uploaded as the content they point to: the instance has no such target. What is
                    # recorded is the link itself: a local edit is re-pointing it.
                    _add_file(tar, target, arcname)
                    plan.uploaded[entry.rel] = file_signature(entry.path) or []
                else:
                    notes.append(f"{plan.mount.local}/{entry.rel}: symlink to a folder left out")
    if compress:
        out.close()  # writes the gzip trailer; the sink itself stays open
    return notes


def _add_file(tar: tarfile.TarFile, content: Path, arcname: str) -> Signature:
    """Add ``content`` as ``arcname``, hashing it as it goes; its signature as uploaded."""
    st = os.stat(content)
    info = tar.gettarinfo(str(content), arcname=arcname)
    with content.open("rb") as f:
        hashing = _Hashing(f)
        tar.addfile(info, hashing)
    return [st.st_size, st.st_mtime_ns, hashing.digest.hexdigest()]


class _Hashing:
    """A file read through, hashing what passes."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data


def file_signature(path: Path) -> Signature | None:
    """``path`` as it is now (a link as itself), or None when there is nothing there."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return [st.st_size, st.st_mtime_ns, f"link:{os.readlink(path)}"]
        if not stat.S_ISREG(st.st_mode):
            return [st.st_size, st.st_mtime_ns, "not a file"]
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns, None]


def unchanged_since(path: Path, recorded: Signature) -> bool:
    """Whether the file at ``path`` is still what was recorded: same size and mtime, or else the same bytes
    (a ``touch`` or a checkout of the same content is not an edit)."""
    now = file_signature(path)
    if now is None or now[0] != recorded[0]:
        return False
    if now[1] == recorded[1] and (now[2] is None or now[2] == recorded[2]):
        return True
    if now[2] is not None:
        return bool(now[2] == recorded[2])
    return bool(file_digest(path) == recorded[2])


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
