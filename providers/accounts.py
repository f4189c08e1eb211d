"""Which marketplaces this user can rent from: API keys and base URLs, from the ecosystem's own variables first.

A marketplace without a key is simply not configured: ``auto`` leaves it out, and asking for it by name is one
clear error. The key lives only here and in the provider's HTTP client (an ``Authorization`` header): never in
the state store, the ledger, an instance's environment, an onstart script or a command line.

Where the key goes is the user's choice alone: a base URL comes from the environment or the user config file
(config.py refuses one in a project's pyproject.toml), and a key is sent only over https, or over plain http to a
loopback address (a local proxy, the test fakes). :func:`key_url_problem` is that rule; the HTTP client checks it
again where it attaches the key.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..paths import user_config_path
from . import REGISTRY, marketplaces

if TYPE_CHECKING:
    from ..config import Settings
    from .declaration import AccountSource

__all__ = ["Account", "accounts", "key_source", "key_url_problem", "require_account"]


@dataclass(frozen=True)
class Account:
    provider: str
    api_key: str = field(repr=False)
    base_url: str
    ssh_user: str | None = None  # None: the provider's own (root on Vast and RunPod, ubuntu on Thunder)


def key_url_problem(url: str) -> str | None:
    """Why an API key must not be sent to ``url``, or None when it may: https, or http to a loopback address."""
    parts = urllib.parse.urlsplit(url.strip())
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return None
    if parts.scheme == "http" and _loopback(host):
        return None
    return "an API key is sent only over https, or over http to a loopback address (127.0.0.1, ::1, localhost)"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def accounts(settings: Settings | None, environ: Mapping[str, str] | None = None) -> dict[str, Account]:
    """Every configured marketplace, in registry order (``settings`` None: no settings file, the environment
    alone). Each declares where its account comes from (``ProviderDeclaration.account``). A base URL a key may not
    be sent to is one :class:`ConfigError` naming the variable or file that set it."""
    env = os.environ if environ is None else environ
    found = {}
    for declared in marketplaces():
        name, source = declared.name, _source(declared.name)
        table = settings.accounts.get(name) if settings is not None else None
        key = env.get(source.key_var) or (table.api_key if table else None)
        if not key:
            continue
        url, where = source.default_url, "the default"
        if env.get(source.url_var):
            url, where = env[source.url_var], source.url_var
        elif table is not None and table.url:
            url, where = table.url, f"url under [{name}] in {user_config_path()}"
        problem = key_url_problem(url)
        if problem is not None:
            raise ConfigError(f"{where} = {url!r}: {problem}; {name}'s key was not sent")
        found[name] = Account(name, key.strip(), url.strip().rstrip("/"), table.ssh_user if table else None)
    return found


def key_source(provider: str, key: str, environ: Mapping[str, str] | None = None) -> str:
    """Where a refused key came from, as the user would fix it: its variable when that holds it (as
    :func:`accounts` prefers), else ``api-key`` under the provider's table in the user file."""
    declared = REGISTRY.get(provider)
    source = declared.account if declared is not None else None
    if source is None:
        return "the API key"
    env = os.environ if environ is None else environ
    if (env.get(source.key_var) or "").strip() == key:
        return source.key_var
    return f"api-key under [{provider}] in {user_config_path()}"


def require_account(name: str, settings: Settings, environ: Mapping[str, str] | None = None) -> Account:
    account = accounts(settings, environ).get(name)
    if account is None:
        source = _source(name)
        raise ConfigError(f"provider {name} has no API key: set {source.key_var}, or api-key under [{name}] in "
                          f"{user_config_path()}")
    return account


def _source(name: str) -> AccountSource:
    """The account source of marketplace ``name`` (a KeyError for a name the registry does not hold)."""
    source = REGISTRY[name].account
    if source is None:
        raise KeyError(f"{name} is not a marketplace")
    return source
