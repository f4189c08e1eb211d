"""The user's own SSH hosts as a provider, as the rest of burst knows it (declaration.py); the provider is
ssh.py."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from .declaration import ProviderDeclaration

if TYPE_CHECKING:
    from .base import Provider
    from .declaration import BuildContext, ProviderConfig

__all__ = ["DECLARATION"]


def _build(config: ProviderConfig, context: BuildContext) -> Provider:
    from .ssh import SSHProvider

    # One round-robin per host list for the session's life, so that job after job goes to the next host.
    rotation = context.rotations.setdefault(config.hosts, itertools.count())
    return SSHProvider(hosts=list(config.hosts), connections=context.connections, rate=config.rate,
                       trust_on_first_use=config.trust_on_first_use, python=config.python or "python3",
                       rotation=rotation)


# No SELF_DESTRUCT: there is no machine to end. When the lease lapses the agent stops the job and removes its
# work/ folder; the results wait in the job folder for the client or `burst cleanup`.
DECLARATION = ProviderDeclaration(name="ssh", build=_build)
