"""Thunder Compute, as the rest of burst knows it (declaration.py); its API is thunder.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .catalog import GpuSpellings
from .declaration import AccountSource, Capability, ProviderDeclaration, from_account

if TYPE_CHECKING:
    from .thunder import ThunderProvider

__all__ = ["DECLARATION", "DEFAULT_URL"]

DEFAULT_URL = "https://api.thundercompute.com:8443"  # thunder-cli's; TNR_API_URL overrides it there


def _provider() -> type[ThunderProvider]:
    from .thunder import ThunderProvider

    return ThunderProvider


DECLARATION = ProviderDeclaration(
    name="thunder",
    build=from_account(_provider),
    # Thunder boots its own templates: no CUSTOM_IMAGE. No SPOT (prototyping is not a bid: PROTOTYPING, its
    # cheaper development mode), no LABELS (ownership rides on the key comment), no SELF_DESTRUCT (no
    # instance-scoped credential is documented, 2026-11-23: the account token must never reach the machine), no
    # STOP (not implemented: burst deletes).
    capabilities=frozenset({Capability.RENTED, Capability.PROTOTYPING}),
    account=AccountSource(key_var="TNR_API_TOKEN", url_var="TNR_API_URL", default_url=DEFAULT_URL),
    gpus=GpuSpellings({"RTX_A6000": "a6000", "A100_80GB": "a100xl", "H100": "h100"}),  # spec keys' first part
    preference=20,  # the seed's job-completion ranking: RunPod, then Thunder, then Vast
)
