"""burst_jupyter.providers: one module per provider with its declaration beside it, their protocol, the GPU
catalog, and the registry.

The registry is one list, one line per provider: the module where it declares itself (declaration.py says what a
declaration holds). Everything else asks the registry, never a provider's name. The session builds providers from
a JobSpec; a reaper rebuilds them from the ``provider_config`` recorded in the state store. Marketplace keys are
never in that record: they are looked up again (accounts.py) wherever a provider is built.

Adding a marketplace ``NAME``:

- ``NAME.py`` (or ``NAME_something.py``): its class, implementing :class:`base.Provider`, with ``name`` and
  ``capabilities`` taken from its declaration, built with keyword arguments ``api_key``, ``base_url`` and
  ``ssh_user``, spelling GPUs through ``DECLARATION.gpus``, and a ``self_destruct()`` recipe if it declares
  :attr:`Capability.SELF_DESTRUCT`;
- ``<that module>_declared.py``: ``DECLARATION = ProviderDeclaration(...)``, importing nothing heavy (its class is
  imported inside ``build``);
- one line below;
- its fake and tests (tests/fakes/, tests/marketplaces.py).

Its account table (``[NAME]`` in the user file), its place in ``auto``, the offer browser, ``%burst providers``,
reconciliation and every message that lists marketplaces follow from the declaration.
"""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from .declaration import BuildContext, Capability, ProviderConfig, ProviderDeclaration

if TYPE_CHECKING:
    from ..config import Settings
    from ..connections import Connections
    from .base import Provider

__all__ = ["REGISTRY", "ProviderConfig", "ProviderDeclaration", "build_provider", "is_marketplace", "marketplaces",
           "offering", "preference"]


def _declared(module: str) -> ProviderDeclaration:
    declaration = importlib.import_module(f".{module}", __name__).DECLARATION
    if not isinstance(declaration, ProviderDeclaration):
        raise TypeError(f"{module}.DECLARATION is not a ProviderDeclaration")
    return declaration


#: Every provider, by the name users type; in this order wherever they are listed (``%burst providers``, errors).
REGISTRY: dict[str, ProviderDeclaration] = {d.name: d for d in (
    _declared("local_declared"),
    _declared("ssh_declared"),
    _declared("vast_declared"),
    _declared("runpod_declared"),
    _declared("thunder_declared"),
    _declared("lambda_cloud_declared"),
)}


def marketplaces() -> list[ProviderDeclaration]:
    """The marketplaces (:attr:`Capability.RENTED`), in registry order."""
    return [d for d in REGISTRY.values() if d.rented]


def offering(capability: Capability) -> str:
    """The providers that declare ``capability``, as help and errors list them: ``vast, runpod``."""
    return ", ".join(d.name for d in REGISTRY.values() if capability in d.capabilities)


def is_marketplace(name: str) -> bool:
    """Whether ``name`` is a provider that rents (the name of a row, of an ``--offer`` prefix, of a browse)."""
    declared = REGISTRY.get(name)
    return declared is not None and declared.rented


def preference() -> list[str]:
    """The marketplaces by their declared preference: the default tie-break between equal prices (``prefer``)."""
    return [d.name for d in sorted(marketplaces(), key=lambda d: d.preference or 0)]


def build_provider(cfg: ProviderConfig, *, connections: Connections, home: Path,
                   rotations: dict[tuple[str, ...], itertools.count[int]] | None = None,
                   settings: Settings | None = None) -> Provider:
    """Build the provider ``cfg`` names (``rotations`` keeps ssh round-robin going across jobs; ``settings``
    holds marketplace accounts, read from the user config and the environment when not given)."""
    context = BuildContext(connections, home, rotations if rotations is not None else {}, settings)
    return REGISTRY[cfg.name].build(cfg, context)
