"""burst_jupyter.providers: one module per provider, their protocol, the GPU catalog, and the registry.

The registry is one explicit dict: a name users type -> how to build that provider. The session builds
providers from a JobSpec; a reaper rebuilds them from the ``provider_config`` recorded in the state store.
Marketplace keys are never in that record: they are looked up again (accounts.py) wherever a provider is built.
"""

from __future__ import annotations

import importlib
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Settings
    from ..connections import Connections
    from .base import Provider

__all__ = ["REGISTRY", "ProviderConfig", "build_provider"]


@dataclass(frozen=True)
class ProviderConfig:
    """What it takes to build a provider again, in a kernel or in a reaper. JSON-able via ``to_json``."""

    name: str
    rate: Decimal = Decimal(0)
    hosts: tuple[str, ...] = ()
    trust_on_first_use: bool = False
    python: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rate": str(self.rate), "hosts": list(self.hosts),
                "trust_on_first_use": self.trust_on_first_use, "python": self.python}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProviderConfig:
        return cls(name=data["name"], rate=Decimal(data.get("rate") or 0), hosts=tuple(data.get("hosts") or ()),
                   trust_on_first_use=bool(data.get("trust_on_first_use")), python=data.get("python"))


@dataclass
class _Context:
    connections: Connections
    home: Path
    rotations: dict[tuple[str, ...], itertools.count[int]] = field(default_factory=dict)
    settings: Settings | None = None

    def account_settings(self) -> Settings:
        if self.settings is None:
            from ..config import load_settings

            self.settings = load_settings(project=False)  # accounts are the user's alone (config.PROJECT_RULES)
        return self.settings


def _local(cfg: ProviderConfig, ctx: _Context) -> Provider:
    from ..paths import private_dir
    from .local import LocalProvider

    return LocalProvider(connections=ctx.connections, rate=cfg.rate, root=private_dir(ctx.home / "local"),
                         python=cfg.python or sys.executable)


def _ssh(cfg: ProviderConfig, ctx: _Context) -> Provider:
    from .ssh import SSHProvider

    rotation = ctx.rotations.setdefault(cfg.hosts, itertools.count())
    return SSHProvider(hosts=list(cfg.hosts), connections=ctx.connections, rate=cfg.rate,
                       trust_on_first_use=cfg.trust_on_first_use, python=cfg.python or "python3",
                       rotation=rotation)


def _marketplace(module: str, cls: str) -> Callable[[ProviderConfig, _Context], Provider]:
    """A builder for a marketplace: its account (key, URL, SSH user) is looked up where it is built."""

    def build(cfg: ProviderConfig, ctx: _Context) -> Provider:
        from .accounts import require_account

        account = require_account(cfg.name, ctx.account_settings())
        provider_cls = getattr(importlib.import_module(f".{module}", __name__), cls)
        provider: Provider = provider_cls(api_key=account.api_key, base_url=account.base_url,
                                          ssh_user=account.ssh_user)
        return provider

    return build


REGISTRY: dict[str, Callable[[ProviderConfig, _Context], Provider]] = {
    "local": _local,
    "ssh": _ssh,
    "vast": _marketplace("vast", "VastProvider"),
    "runpod": _marketplace("runpod", "RunPodProvider"),
    "thunder": _marketplace("thunder", "ThunderProvider"),
}


def build_provider(cfg: ProviderConfig, *, connections: Connections, home: Path,
                   rotations: dict[tuple[str, ...], itertools.count[int]] | None = None,
                   settings: Settings | None = None) -> Provider:
    """Build the provider ``cfg`` names (``rotations`` keeps ssh round-robin going across jobs; ``settings``
    holds marketplace accounts, read from the user config and the environment when not given)."""
    ctx = _Context(connections, home, rotations if rotations is not None else {}, settings)
    return REGISTRY[cfg.name](cfg, ctx)
