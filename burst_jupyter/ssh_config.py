"""An SSH endpoint read through ``~/.ssh/config`` as ``ssh`` reads it: the host, port, user, keys, proxy, known_hosts
file and keepalives to connect with (:class:`SSHTarget`).

Imported by :mod:`burst_jupyter.ssh` only, when an SSH endpoint is used: it imports paramiko.
"""

from __future__ import annotations

import getpass
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko

from .errors import ConfigError, flat_message

if TYPE_CHECKING:
    from .providers.base import Endpoint

__all__ = ["SSHTarget", "default_key_files", "resolve_target"]

# OpenSSH's ServerAliveInterval/ServerAliveCountMax defaults are "off"; a job needs to notice a dead network
# (lost Wi-Fi, a suspended laptop) within a minute rather than TCP's ~15 minutes, and NAT boxes drop idle flows.
_ALIVE_INTERVAL = 15
_ALIVE_COUNT_MAX = 3
# The keys ssh tries when neither -i nor IdentityFile names one, in OpenSSH's order (those paramiko can use).
_DEFAULT_KEYS = ("id_rsa", "id_ecdsa", "id_ed25519")


@dataclass(frozen=True, slots=True)
class SSHTarget:
    """An endpoint after ~/.ssh/config: everything needed to connect."""

    alias: str  # the host as the user wrote it; may be a config alias
    hostname: str
    port: int
    user: str
    key_files: tuple[Path, ...]  # the endpoint's key first, then IdentityFile lines, else the default keys
    explicit_key: Path | None
    identities_only: bool
    proxy_command: str | None
    known_hosts: Path
    alive_interval: int
    alive_count_max: int

    def __str__(self) -> str:
        return f"{self.user}@{self.alias}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        # How OpenSSH names a host in known_hosts: the real host name, with the port only when it is not 22.
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def resolve_target(endpoint: Endpoint, ssh_config: Path | None, known_hosts: Path | None) -> SSHTarget:
    """Where and how to connect for ``endpoint``, as ``ssh`` would read it from ``ssh_config`` (defaults:
    ``$BURST_SSH_CONFIG``, else ``~/.ssh/config``; a rented instance reads none). Raises :class:`ConfigError`
    for a config that cannot be read or holds a bad number."""
    assert endpoint.host is not None
    default_path = Path.home() / ".ssh" / "config"
    path = ssh_config or Path(os.environ.get("BURST_SSH_CONFIG") or default_path)
    rented = endpoint.known_hosts is not None
    try:
        # A rented instance is an address the provider gave us: the user's ~/.ssh/config does not describe it.
        config = paramiko.SSHConfig.from_path(str(path)) if path.exists() and not rented else paramiko.SSHConfig()
        options = config.lookup(endpoint.host)
    except (OSError, paramiko.SSHException) as exc:
        raise ConfigError(f"cannot read the ssh config {path}: {flat_message(exc)}") from exc

    hostname: str = options.get("hostname", endpoint.host)
    try:
        # Endpoint.port cannot tell an explicit 22 from the default, so 22 lets the config's Port through.
        port = endpoint.port if endpoint.port != 22 else int(options.get("port", 22))
        alive_interval = int(options.get("serveraliveinterval", _ALIVE_INTERVAL))
        alive_count_max = int(options.get("serveralivecountmax", _ALIVE_COUNT_MAX))
    except ValueError as exc:
        raise ConfigError(f"{path}, Host {endpoint.host}: {exc}") from exc
    user: str = endpoint.user or options.get("user") or getpass.getuser()

    explicit = Path(endpoint.key_path).expanduser() if endpoint.key_path else None
    configured = [Path(p).expanduser() for p in options.get("identityfile", [])]
    # Like ssh: the default keys only when neither -i (the endpoint's key) nor IdentityFile names one.
    key_files = [explicit, *configured] if explicit else configured
    if not key_files:
        key_files = list(default_key_files())

    proxy: str | None = options.get("proxycommand")
    jump: str | None = options.get("proxyjump")
    if proxy is None and jump and jump.lower() != "none":
        # paramiko has no ProxyJump; ssh itself does it this way (-W through the last hop, -J for the ones before).
        *before, last = jump.split(",")
        # The hops must resolve the same aliases; but -F also drops /etc/ssh/ssh_config, so only when needed.
        config_arg = ["-F", str(path)] if path != default_path and path.exists() else []
        hops = ["-J", ",".join(before)] if before else []
        proxy = shlex.join(["ssh", *config_arg, *hops, "-W", f"[{hostname}]:{port}", f"ssh://{last}"])
    if proxy is not None and proxy.lower() == "none":
        proxy = None

    if rented:
        known_hosts = Path(str(endpoint.known_hosts))  # pinned per instance (Endpoint.known_hosts says why)
    elif known_hosts is None:
        configured_known = options.get("userknownhostsfile", "").split()
        known_hosts = Path(configured_known[0] if configured_known else "~/.ssh/known_hosts").expanduser()

    return SSHTarget(
        alias=endpoint.host,
        hostname=hostname,
        port=port,
        user=user,
        key_files=tuple(key_files),
        explicit_key=explicit,
        # Only the job's own key goes to a rented machine: the user's keys are none of its business.
        identities_only=rented or options.get("identitiesonly", "no").lower() == "yes",
        proxy_command=proxy,
        known_hosts=known_hosts,
        alive_interval=alive_interval,
        alive_count_max=alive_count_max,
    )


def default_key_files() -> tuple[Path, ...]:
    """The key files ssh tries when neither -i nor IdentityFile names one."""
    return tuple(Path.home() / ".ssh" / name for name in _DEFAULT_KEYS)
