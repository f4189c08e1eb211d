"""Logging in over SSH with keys as ``ssh`` offers them: the endpoint's key file, IdentityFile lines or the default
keys, an encrypted key file through ssh-agent when the agent holds it, then the agent's other keys unless
IdentitiesOnly. burst never asks for a passphrase or a password.

Imported by :mod:`burst_jupyter.ssh` only, when an SSH endpoint is used: it imports paramiko.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import paramiko

from .errors import AuthFailed, flat_message
from .ssh_config import SSHTarget, default_key_files

__all__ = ["authenticate"]


def authenticate(transport: Any, target: SSHTarget) -> None:
    """Log ``target.user`` in on ``transport`` with the first key the server takes.

    Raises :class:`AuthFailed` naming every key tried and every key file that could not be used.
    """
    try:
        agent = paramiko.Agent()  # no SSH_AUTH_SOCK, or a stale one: an agent without keys
    except paramiko.SSHException:  # something on SSH_AUTH_SOCK that does not speak the agent protocol
        agent = None
    try:
        keys, skipped = _candidate_keys(target, agent.get_keys() if agent else ())
        tried: list[str] = []
        for label, key in keys:
            try:
                remaining: list[str] = transport.auth_publickey(target.user, key)
            except paramiko.BadAuthenticationType as exc:
                offers = ", ".join(exc.allowed_types)
                raise AuthFailed(f"{target} does not take SSH keys (it offers: {offers})") from exc
            except paramiko.AuthenticationException:
                tried.append(label)
                continue
            except (paramiko.SSHException, OSError, EOFError) as exc:
                # sshd hangs up after MaxAuthTries (default 6) refused keys.
                tried.append(label)
                raise AuthFailed(_refused(target, tried, skipped, f"; then it hung up ({flat_message(exc)})")) from exc
            if not transport.is_authenticated():
                raise AuthFailed(f"{target} wants more than a key ({', '.join(remaining)}); burst logs in with keys")
            return
        if not keys:
            raise AuthFailed(
                f"no SSH key to offer {target}: give the endpoint a key_path, set IdentityFile in ~/.ssh/config, "
                f"add a key to ssh-agent or create ~/.ssh/id_ed25519" + "".join(f"; {s}" for s in skipped)
            )
        raise AuthFailed(_refused(target, tried, skipped))
    finally:
        if agent:
            agent.close()


def _refused(target: SSHTarget, tried: list[str], skipped: list[str], tail: str = "") -> str:
    return f"{target} refused the login of user {target.user} with {', '.join(tried)}{tail}" + "".join(
        f"; {s}" for s in skipped
    )


def _candidate_keys(target: SSHTarget, agent_keys: tuple[Any, ...]) -> tuple[list[tuple[str, Any]], list[str]]:
    """The keys to offer, in ssh's order: key files (through the agent when a file is encrypted but the agent
    holds it), then the agent's other keys unless IdentitiesOnly. Also says which key files could not be used."""
    by_blob = {k.asbytes(): k for k in agent_keys}
    keys: list[tuple[str, Any]] = []
    skipped: list[str] = []
    seen: set[bytes] = set()
    for path in target.key_files:
        try:
            key = paramiko.PKey.from_path(path)
            label = str(path)
        except FileNotFoundError as exc:
            if path == target.explicit_key:
                raise AuthFailed(f"cannot use key {path}: no such file") from exc
            if path not in default_key_files():
                skipped.append(f"no key file {path}")
            continue
        except Exception as exc:  # cryptography and paramiko raise ValueError, TypeError, SSHException, ...
            reason = _key_problem(exc)
            key = by_blob.get(_public_blob(path))
            label = f"{path} (through ssh-agent)"
            if key is None and path == target.explicit_key:
                raise AuthFailed(f"cannot use key {path}: {reason}") from exc
            if key is None:
                skipped.append(f"cannot use key {path}: {reason}")
                continue
        if key.asbytes() not in seen:
            seen.add(key.asbytes())
            keys.append((f"{label} ({key.fingerprint})", key))
    if not target.identities_only:
        for key in agent_keys:
            if key.asbytes() not in seen:
                seen.add(key.asbytes())
                comment = f" {key.comment}" if key.comment else ""
                keys.append((f"agent key {key.fingerprint}{comment}", key))
    return keys, skipped


def _key_problem(exc: BaseException) -> str:
    if isinstance(exc, TypeError):  # cryptography: "Key is password-protected, but password was not provided"
        return "it is encrypted and burst cannot ask for a passphrase; load it into ssh-agent with ssh-add"
    if isinstance(exc, OSError):
        return exc.strerror or flat_message(exc)
    return "not a private key in a format paramiko reads (OpenSSH, or PEM RSA/ECDSA)"


def _public_blob(private_key_path: Path) -> bytes | None:
    """The key blob from ``<path>.pub``, so an encrypted key file can be matched with an agent key."""
    try:
        return base64.b64decode(Path(f"{private_key_path}.pub").read_text().split()[1], validate=True)
    except (OSError, IndexError, ValueError):
        return None
