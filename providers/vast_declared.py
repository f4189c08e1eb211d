"""Vast.ai, as the rest of burst knows it (declaration.py); its API is vast.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .catalog import GpuSpellings
from .declaration import AccountSource, Capability, ProviderDeclaration, from_account

if TYPE_CHECKING:
    from .vast import VastProvider

__all__ = ["DECLARATION", "DEFAULT_URL"]

DEFAULT_URL = "https://console.vast.ai"  # the vastai CLI's; VAST_URL overrides it there (paths start /api/v0)


def _provider() -> type[VastProvider]:
    from .vast import VastProvider

    return VastProvider


DECLARATION = ProviderDeclaration(
    name="vast",
    build=from_account(_provider),
    capabilities=frozenset({Capability.RENTED, Capability.CUSTOM_IMAGE, Capability.SPOT, Capability.STOP,
                            Capability.LABELS, Capability.SELF_DESTRUCT}),
    account=AccountSource(key_var="VAST_API_KEY", url_var="VAST_URL", default_url=DEFAULT_URL),
    # Vast's gpu_name, with spaces (reference 1.3); an A100's form factor does not say its memory: gpu_ram does.
    gpus=GpuSpellings({
        "RTX_3090": "RTX 3090", "RTX_4090": "RTX 4090", "RTX_5090": "RTX 5090", "RTX_A6000": "RTX A6000",
        "A40": "A40", "L4": "L4", "L40S": "L40S", "T4": "Tesla T4",
        "A100_40GB": ("A100 PCIE", "A100 SXM4"), "A100_80GB": ("A100 SXM4", "A100 PCIE"),
        "H100": ("H100 SXM", "H100 PCIE", "H100 NVL"), "H200": "H200",
    }),
    preference=30,  # the seed's job-completion ranking: RunPod, then Thunder, then Vast
)
