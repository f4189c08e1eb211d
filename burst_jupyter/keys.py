"""A fresh SSH key pair per rented job: made before the launch, given to the provider its own way, deleted once
the instance is confirmed gone.

The private half is written 0600 under ``BURST_HOME/keys`` (a reaper in another process may need it to sync
results back); the public half carries the comment ``TAG/JOB_ID``, which is also how a provider without labels
(Thunder) finds what this install owns. The instance's host key is pinned in a known_hosts file beside the key at
first contact (``Endpoint.known_hosts``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from .paths import open_private, private_dir

__all__ = ["JobKey", "create_job_key", "remove_job_key"]


@dataclass(frozen=True)
class JobKey:
    private_path: Path
    public_line: str  # "ssh-ed25519 AAAA... TAG/JOB_ID"
    known_hosts: Path


def _paths(folder: Path, job_id: str) -> tuple[Path, Path, Path]:
    return folder / job_id, folder / f"{job_id}.pub", folder / f"{job_id}.known_hosts"


def create_job_key(folder: Path, job_id: str, *, comment: str) -> JobKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_dir(folder)
    private_path, public_path, known = _paths(folder, job_id)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    # Created 0600 from the start: no moment where another user could read it.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(private)
    line = f"{public.decode()} {comment}"
    with open_private(public_path, "w") as file:
        file.write(line + "\n")
    return JobKey(private_path, line, known)


def remove_job_key(folder: Path, job_id: str) -> None:
    """After the instance is confirmed gone: the key opens nothing any more, and nothing should hold it."""
    for path in _paths(folder, job_id):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
