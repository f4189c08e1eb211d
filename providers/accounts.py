"""Which marketplaces this user can rent from: API keys and base URLs, from the ecosystem's own variables first.

A marketplace without a key is simply not configured: ``auto`` leaves it out, and asking for it by name is one
clear error. The key lives only here and in the provider's HTTP client (an ``Authorization`` header): never in
the state store, the ledger, an instance's environment, an onstart script or a command line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..paths import user_config_path

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["MARKETPLACES", "Account", "accounts", "require_account"]


@dataclass(frozen=True)
class _Source:
    key_var: str
    url_var: str
    default_url: str


#: The variables each provider's own CLI or SDK reads (reference/provider-apis.md; vastai CLI, runpod-python,
#: thunder-cli). The URL is the API root: Vast paths start /api/v0, RunPod's is /graphql, Thunder's /v1.
MARKETPLACES: dict[str, _Source] = {
    "vast": _Source("VAST_API_KEY", "VAST_URL", "https://console.vast.ai"),
    "runpod": _Source("RUNPOD_API_KEY", "RUNPOD_API_BASE_URL", "https://api.runpod.io"),
    "thunder": _Source("TNR_API_TOKEN", "TNR_API_URL", "https://api.thundercompute.com:8443"),
}


@dataclass(frozen=True)
class Account:
    provider: str
    api_key: str = field(repr=False)
    base_url: str
    ssh_user: str | None = None  # None: the provider's own (root on Vast and RunPod, ubuntu on Thunder)


def accounts(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, Account]:
    """Every configured marketplace, in MARKETPLACES order."""
    env = os.environ if environ is None else environ
    found = {}
    for name, source in MARKETPLACES.items():
        table = getattr(settings, name)
        key = env.get(source.key_var) or (table.api_key if table else None)
        if not key:
            continue
        url = env.get(source.url_var) or (table.url if table else None) or source.default_url
        found[name] = Account(name, key.strip(), url.rstrip("/"), table.ssh_user if table else None)
    return found


def require_account(name: str, settings: Settings, environ: Mapping[str, str] | None = None) -> Account:
    account = accounts(settings, environ).get(name)
    if account is None:
        source = MARKETPLACES[name]
        raise ConfigError(f"provider {name} has no API key: set {source.key_var}, or api-key under [{name}] in "
                          f"{user_config_path()}")
    return account
