"""RunPod, as the rest of burst knows it (declaration.py); its API is runpod.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .catalog import GpuSpellings
from .declaration import AccountSource, Capability, ProviderDeclaration, from_account

if TYPE_CHECKING:
    from .runpod import RunPodProvider

__all__ = ["DECLARATION", "DEFAULT_BASE_URL"]

DEFAULT_BASE_URL = "https://api.runpod.io"  # runpod-python's default; RUNPOD_API_BASE_URL overrides it there


def _provider() -> type[RunPodProvider]:
    from .runpod import RunPodProvider

    return RunPodProvider


DECLARATION = ProviderDeclaration(
    name="runpod",
    build=from_account(_provider),
    # SPOT: RunPod removed the spot docs on 2026-05-06 but kept podRentInterruptable in the schema; whether spot
    # can still be rented is UNCONFIRMED (2.1). Kept (2026-11-23): a refusal comes back as a GraphQL error.
    capabilities=frozenset({Capability.RENTED, Capability.CUSTOM_IMAGE, Capability.SPOT, Capability.STOP,
                            Capability.SELF_DESTRUCT}),
    account=AccountSource(key_var="RUNPOD_API_KEY", url_var="RUNPOD_API_BASE_URL", default_url=DEFAULT_BASE_URL),
    # RunPod's GPU type ids, which are also what nvidia-smi prints on its pods.
    gpus=GpuSpellings({
        "RTX_3090": "NVIDIA GeForce RTX 3090", "RTX_4090": "NVIDIA GeForce RTX 4090",
        "RTX_5090": "NVIDIA GeForce RTX 5090", "RTX_A6000": "NVIDIA RTX A6000", "A40": "NVIDIA A40",
        "L4": "NVIDIA L4", "L40S": "NVIDIA L40S", "T4": "Tesla T4", "A100_40GB": "NVIDIA A100-PCIE-40GB",
        "A100_80GB": ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
        "H100": ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"), "H200": "NVIDIA H200",
    }),
    preference=10,  # the seed's job-completion ranking: RunPod, then Thunder, then Vast
)
