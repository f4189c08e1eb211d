"""known_hosts as OpenSSH keeps it: which keys a host is known by, whether the key it shows now is one of them,
and trust-on-first-use.

- Reading: plain and hashed (``HashKnownHosts``) host names, ``*``/``?`` wildcards and ``!`` negation,
  ``[host]:port`` for ports other than 22, ``@revoked`` markers; ``@cert-authority`` lines are skipped (burst
  does not check host certificates) and so are corrupt lines, as ssh does.
- Checking: a key on record passes; a revoked one, or any *other* key on record for the host, is refused
  (CHANGED: possibly a man-in-the-middle; trust-on-first-use never overrides that); a host with no key on record
  is refused with its fingerprint and how to trust it, unless trust-on-first-use is on, which appends the key
  (ssh's ``StrictHostKeyChecking=accept-new``).

Used by :mod:`burst_jupyter.ssh` during the handshake; it names the host through the small :class:`Host`
protocol, so this module needs no paramiko import of its own (keys are paramiko ``PKey`` objects, duck-typed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import HostKeyError
from .paths import open_private

__all__ = ["Host", "KnownKey", "check_host_key", "prefer_known_key_types", "read_known_hosts"]


class Host(Protocol):
    """The host as known_hosts names it, and the file that holds its keys."""

    @property
    def hostname(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def known_hosts(self) -> Path: ...

    @property
    def known_hosts_name(self) -> str:
        """``host``, or ``[host]:port`` when the port is not 22."""
        ...


@dataclass(frozen=True, slots=True)
class KnownKey:
    path: Path
    line: int
    key_type: str
    blob: bytes
    revoked: bool


def read_known_hosts(target: Host) -> list[KnownKey]:
    """The known_hosts entries for this host, plain or hashed, wildcards and @revoked included."""
    try:
        text = target.known_hosts.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise HostKeyError(f"cannot read {target.known_hosts}: {exc.strerror}") from exc
    name = target.known_hosts_name.lower()
    known = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else None
        # @cert-authority lines vouch for host certificates, which burst does not check.
        if marker == "@cert-authority" or len(fields) < 3 or not _host_matches(fields[0], name):
            continue
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except binascii.Error:
            continue  # ssh skips a corrupt line too
        known.append(KnownKey(target.known_hosts, number, fields[1], blob, marker == "@revoked"))
    return known


def _host_matches(patterns: str, name: str) -> bool:
    matched = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        if pattern.startswith("|1|"):  # HashKnownHosts: |1|base64(salt)|base64(HMAC-SHA1(salt, name))
            try:
                salt, digest = (base64.b64decode(part) for part in pattern[3:].split("|"))
            except (ValueError, binascii.Error):
                continue
            hit = hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)
        else:
            # ssh patterns know only * and ?; fnmatch would read the [ ] of "[host]:port" as a character class.
            regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
            hit = re.fullmatch(regex, name) is not None
        if hit and negated:
            return False
        matched = matched or hit
    return matched


def prefer_known_key_types(transport: Any, known: list[KnownKey]) -> None:
    # Like ssh, ask first for a key type already known for this host: a server with an ed25519 and an RSA key
    # whose RSA key is in known_hosts would otherwise present the ed25519 one, which would look new.
    known_types = {k.key_type for k in known if not k.revoked}
    options = transport.get_security_options()
    offered: tuple[str, ...] = options.key_types
    first = [t for t in offered if ("ssh-rsa" if t.startswith("rsa-sha2-") else t) in known_types]
    options.key_types = (*first, *(t for t in offered if t not in first))


def check_host_key(key: Any, target: Host, known: list[KnownKey], trust_new: bool) -> None:
    blob: bytes = key.asbytes()
    where = f"{target.hostname}:{target.port}"
    offered = f"{key.get_name()} {key.fingerprint}"
    same = [k for k in known if k.blob == blob]
    for entry in same:
        if entry.revoked:  # wherever it stands in the file, a revocation beats a plain entry
            raise HostKeyError(f"host key of {where} ({offered}) is marked @revoked in {entry.path} line {entry.line}")
    if same:
        return
    others = sorted((k for k in known if not k.revoked), key=lambda k: k.key_type != key.get_name())
    if others:
        # Any other key on record means this one is not the host we knew, whatever its type; TOFU never applies.
        old = others[0]
        raise HostKeyError(
            f"host key for {where} has CHANGED: it now shows {offered}, but {old.path} line {old.line} holds "
            f"another key; this can be a man-in-the-middle attack. If the host was reinstalled, remove the old "
            f"key with `ssh-keygen -R '{target.known_hosts_name}' -f {old.path}` and connect again"
        )
    if not trust_new:
        port = f"-p {target.port} " if target.port != 22 else ""
        raise HostKeyError(
            f"host key of {where} is unknown ({offered}); if that fingerprint is the host's, add it with "
            f"`ssh-keyscan {port}{target.hostname} >> {target.known_hosts}`, or allow trust-on-first-use "
            f"(--trust-new-host, JobSpec ssh_trust_on_first_use=True)"
        )
    _remember_host_key(key, target)


def _remember_host_key(key: Any, target: Host) -> None:
    """Append the key to known_hosts, as ssh's StrictHostKeyChecking=accept-new does."""
    path = target.known_hosts
    line = f"{target.known_hosts_name} {key.get_name()} {key.get_base64()}\n".encode()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        existing = path.read_bytes() if path.exists() else b""
        if existing and not existing.endswith(b"\n"):
            line = b"\n" + line
        # One O_APPEND write per line, so kernels connecting at the same time do not interleave.
        with open_private(path, "ab") as f:  # a new file (a job's own, in the 0700 keys folder) is 0600
            f.write(line)
    except OSError as exc:
        raise HostKeyError(f"cannot add the host key of {target.hostname} to {path}: {exc.strerror}") from exc
