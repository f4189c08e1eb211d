"""Result sinks: a second home for a job's rw results, so they outlive the local folder they were synced into.

A sink is a tiny protocol (``describe``, ``check``, ``put``) with two kinds behind it: a local folder, and an
S3-compatible object store (AWS S3, Cloudflare R2, or any endpoint boto3 is pointed at). :func:`open_sink`
parses the URL the user wrote. A sink stores keys under its root and knows nothing of mounts: the layout inside
(``<mount name>/<path>``) belongs to ``sync_back.receive_results``.

=====================  ==========================================================================================
``./runs``, ``/abs``   a folder (relative to the directory the job was submitted from)
``file:///abs/runs``   the same, as a URL
``s3://bucket/prefix`` AWS S3; any other endpoint through ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
``r2://bucket/prefix`` Cloudflare R2 at ``https://$R2_ACCOUNT_ID.r2.cloudflarestorage.com`` (or ``AWS_ENDPOINT_URL``)
=====================  ==========================================================================================

Credentials for s3:// and r2:// are boto3's own (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, ...).

Example:
    >>> sink = open_sink("s3://my-bucket/runs", job_id="sweep-1a2b3c4d")
    >>> sink.describe()
    's3://my-bucket/runs/sweep-1a2b3c4d'
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigError, SyncError
from .sync_back import SCRATCH, replace_atomically, sweep

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["PRESIGN_MAX_SECONDS", "SCHEMES", "FolderSink", "ResultSink", "S3Sink", "open_sink"]

#: SigV4 presigned URLs live at most 7 days.
PRESIGN_MAX_SECONDS = 7 * 24 * 3600
#: What ``open_sink`` understands, as the user would write it (a plain path is a folder too).
SCHEMES = ("a folder", "file://", "s3://", "r2://")

_JOB_ID = "{job_id}"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Lenient on purpose: S3's rules differ by region and age (old us-east-1 buckets allow capitals and _); the
# store itself refuses a bad name at check(). This only catches what cannot be a bucket at all.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


class ResultSink(Protocol):
    """Where results are also stored. Implementations are thread-safe: ``put`` runs on a job's reader thread."""

    def describe(self) -> str:
        """The sink's location as a URL; ``open_sink(describe())`` opens the same place (the reaper relies on it)."""
        ...

    def check(self) -> None:
        """Raise :class:`ConfigError` (one line) if ``put`` cannot work. Called before anything is rented."""
        ...

    def put(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key`` (``a/b.txt``), replacing what is there. Raises SyncError."""
        ...

    def presigned_put(self, key: str, *, expires_seconds: float) -> str | None:
        """A URL anyone holding it can PUT one object at ``key`` to, for ``expires_seconds``, and nothing else;
        None when the instance cannot reach the sink. The agent uploads a lapsed job's results there."""
        ...

    def fetch(self, key: str, dest: Path) -> bool:
        """Copy the object at ``key`` to ``dest``; False when there is none. Raises SyncError."""
        ...


class FolderSink:
    """A local folder (another disk, a synced share). Files are written atomically, like the results themselves."""

    def __init__(self, root: Path, *, label: str | None = None) -> None:
        self.root = root
        self._label = label or str(root)  # what the user wrote, for messages
        self._swept = False

    def describe(self) -> str:
        return str(self.root)

    def check(self) -> None:
        # Create nothing yet (a later check may still refuse the job): only prove the folder can be made.
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"result sink {self._label}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"result sink {self._label}: cannot write into {existing}")

    def put(self, key: str, path: Path) -> None:
        if not self._swept:  # what a sync killed mid-put left here goes first (once: puts come file by file)
            self._swept = True
            sweep(self.root / SCRATCH)
        try:
            with replace_atomically(self.root / key, scratch=self.root / SCRATCH) as tmp:
                shutil.copy2(path, tmp)
        except OSError as exc:
            raise SyncError(f"result sink {self._label}: could not store {key}: {exc.strerror or exc}") from exc

    def presigned_put(self, key: str, *, expires_seconds: float) -> str | None:
        return None  # a folder on this machine: a rented instance cannot reach it

    def fetch(self, key: str, dest: Path) -> bool:
        try:
            shutil.copyfile(self.root / key, dest)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise SyncError(f"result sink {self._label}: could not read {key}: {exc.strerror or exc}") from exc
        return True


class S3Sink:
    """A bucket (and key prefix) in an S3-compatible store. boto3 loads on first use; one client serves all puts.

    ``endpoint_url`` None lets boto3 choose: AWS, or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (boto3 >= 1.28
    reads them itself). Big files go up in parts (``upload_file`` switches to multipart past 8 MiB).
    """

    def __init__(self, *, bucket: str, prefix: str = "", scheme: str = "s3", endpoint_url: str | None = None,
                 region: str | None = None, label: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.scheme = scheme
        self.endpoint_url = endpoint_url
        self.region = region
        self._label = label or self.describe()
        self._lock = threading.Lock()
        self._s3: Any = None  # a botocore client; untyped (boto3 ships no stubs)

    def describe(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def check(self) -> None:
        client = self._client()
        botocore = _botocore_exceptions()
        try:
            client.head_bucket(Bucket=self.bucket)
        except (botocore.ClientError, botocore.BotoCoreError) as exc:
            raise ConfigError(f"result sink {self._label}: {self._explain(exc)}") from exc

    def put(self, key: str, path: Path) -> None:
        client = self._client()
        botocore = _botocore_exceptions()
        from boto3.exceptions import S3UploadFailedError

        try:
            client.upload_file(str(path), self.bucket, self.key(key))
        except (botocore.ClientError, botocore.BotoCoreError, S3UploadFailedError, OSError) as exc:
            raise SyncError(f"result sink {self._label}: could not store {key}: {self._explain(exc)}") from exc

    def presigned_put(self, key: str, *, expires_seconds: float) -> str | None:
        """A SigV4 presigned ``PUT`` of ``<prefix>/<key>``: a signature for that one object, not the credentials.
        Made locally (no request); SigV4 caps the lifetime at 7 days, so a longer one is cut to that."""
        seconds = int(min(max(expires_seconds, 1.0), PRESIGN_MAX_SECONDS))
        try:
            url = self._client().generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": self.key(key)}, ExpiresIn=seconds)
        except (_botocore_exceptions().BotoCoreError, _botocore_exceptions().ClientError) as exc:
            raise SyncError(f"result sink {self._label}: cannot sign an upload: {self._explain(exc)}") from exc
        return str(url)

    def fetch(self, key: str, dest: Path) -> bool:
        client = self._client()
        botocore = _botocore_exceptions()
        try:
            client.download_file(self.bucket, self.key(key), str(dest))
        except botocore.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                return False
            raise SyncError(f"result sink {self._label}: could not read {key}: {self._explain(exc)}") from exc
        except (botocore.BotoCoreError, OSError) as exc:
            raise SyncError(f"result sink {self._label}: could not read {key}: {self._explain(exc)}") from exc
        return True

    def _client(self) -> Any:
        with self._lock:
            if self._s3 is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise ConfigError(f"result sink {self._label} needs boto3: pip install boto3 "
                                      "(or burst-jupyter[s3])") from None
                # Bounded waits: check() runs in the cell before anything is rented, and a put holds the
                # results transfer; botocore's defaults (60 s connect, legacy retries) would stall both.
                # SigV4 also for presigned URLs (older botocore presigns S3 with SigV2 in us-east-1).
                config = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                                signature_version="s3v4")
                # A session of our own: boto3's default session is not safe to share between threads.
                self._s3 = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
            return self._s3

    def _explain(self, exc: BaseException) -> str:
        """One line a user can act on, from a botocore/boto3 error."""
        botocore = _botocore_exceptions()
        cause = exc.__cause__ or exc.__context__
        if not isinstance(exc, botocore.ClientError) and isinstance(cause, botocore.ClientError):
            exc = cause  # upload_file wraps the store's answer in S3UploadFailedError("Failed to upload ...")
        if isinstance(exc, botocore.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                return f"bucket {self.bucket!r} does not exist"
            if code in ("403", "AccessDenied", "Forbidden", "AllAccessDisabled"):
                return f"access to bucket {self.bucket!r} was denied (check the credentials and their permissions)"
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "401"):
                return f"the credentials were refused ({code})"
            if code in ("301", "PermanentRedirect"):
                return f"bucket {self.bucket!r} is in another region; set AWS_DEFAULT_REGION to it"
            return f"{code}: {error.get('Message') or exc}"
        if isinstance(exc, botocore.NoCredentialsError):
            return "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        if isinstance(exc, botocore.EndpointConnectionError):
            return f"cannot reach {getattr(exc, 'kwargs', {}).get('endpoint_url') or self.endpoint_url or 'S3'}"
        if isinstance(exc, OSError):
            return exc.strerror or str(exc)
        text = str(exc) or type(exc).__name__
        return text.splitlines()[0]


def _botocore_exceptions() -> Any:
    """botocore's exception classes (untyped: botocore ships no stubs), imported only once a store is used."""
    import botocore.exceptions

    return botocore.exceptions


def open_sink(url: str, *, job_id: str | None = None) -> ResultSink:
    """The sink for ``url``, rooted at the job's own folder: ``{job_id}`` in the URL is replaced by ``job_id``,
    otherwise ``job_id`` is appended as the last path segment (None: the URL is the root as it stands).

    Parses only; nothing is created or contacted (that is :meth:`ResultSink.check`). Raises
    :class:`ConfigError` for an unknown scheme, a missing bucket name, or r2:// without an account.
    """
    label = url.strip()
    if not label:
        raise ConfigError("result sink is empty; give a folder, s3://bucket/prefix or r2://bucket/prefix")
    text = label
    if job_id is not None:
        text = text.replace(_JOB_ID, job_id) if _JOB_ID in text else f"{text.rstrip('/')}/{job_id}"
    match = _SCHEME_RE.match(text)
    scheme = match.group(1).lower() if match else ""
    if scheme in ("", "file"):
        return FolderSink(_folder(text, label), label=label)
    builder: Callable[[str, str, str], S3Sink] | None = {"s3": _s3, "r2": _r2}.get(scheme)
    if builder is None:
        raise ConfigError(f"result sink {label}: unknown scheme {scheme}://; use {', '.join(SCHEMES)}")
    bucket, _, prefix = text[match.end():].partition("/") if match else ("", "", "")
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(f"result sink {label}: name a bucket, as in {scheme}://bucket/prefix")
    prefix = "/".join(part for part in prefix.split("/") if part)  # a//b and trailing slashes: one key form
    return builder(bucket, prefix, label)


def _folder(text: str, label: str) -> Path:
    path = text.removeprefix("file://")
    if text.startswith("file://"):
        path = path.removeprefix("localhost")
        if not path.startswith("/"):
            raise ConfigError(f"result sink {label}: a file:// URL takes an absolute path (file:///data/runs)")
    # Absolute now: the reaper that may finish this job later runs from another directory.
    return Path(path).expanduser().absolute()


def _s3(bucket: str, prefix: str, label: str) -> S3Sink:
    return S3Sink(bucket=bucket, prefix=prefix, label=label)


def _r2(bucket: str, prefix: str, label: str) -> S3Sink:
    return S3Sink(bucket=bucket, prefix=prefix, scheme="r2", endpoint_url=_r2_endpoint(label), region="auto",
                  label=label)


def _r2_endpoint(label: str = "r2://") -> str:
    """R2's S3 endpoint: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` when set (a proxy, a test server), else
    ``https://$R2_ACCOUNT_ID.r2.cloudflarestorage.com``. R2 signs with region ``auto``."""
    override = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if override:
        return override
    account = os.environ.get("R2_ACCOUNT_ID", "").strip()
    if not account:
        raise ConfigError(f"result sink {label}: set R2_ACCOUNT_ID to your Cloudflare account id "
                          "(or AWS_ENDPOINT_URL to the R2 endpoint)")
    if not re.fullmatch(r"[A-Za-z0-9]+", account):
        raise ConfigError(f"result sink {label}: R2_ACCOUNT_ID {account!r} is not an account id")
    return f"https://{account}.r2.cloudflarestorage.com"
