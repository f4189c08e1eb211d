"""This machine as a provider, as the rest of burst knows it (declaration.py); the provider is local.py."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .declaration import Capability, ProviderDeclaration

if TYPE_CHECKING:
    from .base import Provider
    from .declaration import BuildContext, ProviderConfig

__all__ = ["DECLARATION"]


def _build(config: ProviderConfig, context: BuildContext) -> Provider:
    from ..paths import private_dir
    from .local import LocalProvider

    return LocalProvider(connections=context.connections, rate=config.rate,
                         root=private_dir(context.home / "local"), python=config.python or sys.executable)


# No SELF_DESTRUCT: there is no machine to end. When the lease lapses the agent stops the job and removes its
# work/ folder; the results wait in the job folder for the client or `burst cleanup`.
DECLARATION = ProviderDeclaration(name="local", build=_build, capabilities=frozenset({Capability.LOCAL_FILES}))
