"""Lambda Cloud, as the rest of burst knows it (declaration.py); its API is lambda_cloud.py. The provider's name is
``lambda``; no module can be called that (a Python keyword), and nothing needs one to be."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .catalog import GpuSpellings
from .declaration import AccountSource, Capability, ProviderDeclaration, from_account

if TYPE_CHECKING:
    from .lambda_cloud import LambdaProvider

__all__ = ["DECLARATION", "DEFAULT_URL"]

DEFAULT_URL = "https://cloud.lambda.ai"  # the 1.10.0 spec's server; cloud.lambdalabs.com is deprecated (4.1)


def _provider() -> type[LambdaProvider]:
    from .lambda_cloud import LambdaProvider

    return LambdaProvider


DECLARATION = ProviderDeclaration(
    name="lambda",
    build=from_account(_provider),
    # RENTED: billed from the launch request, the safe reading of Lambda's three accounts of when billing starts
    # (4.9, 2026-12-06). Lambda boots its own Lambda Stack image: no CUSTOM_IMAGE. No SPOT (none is sold, 4.3),
    # no LABELS (tags exist but no list filters on them, 4.5), no SELF_DESTRUCT (Lambda puts no credential on an
    # instance, and the account key must never go there, 4.10), no STOP (an instance can only be terminated, 4.7).
    capabilities=frozenset({Capability.RENTED}),
    # LAMBDA_API_KEY is the variable of every curl example in Lambda's API reference (4.1). No two tools agree on
    # a URL variable; LAMBDA_API_BASE_URL is lambda-cloud-mcp's (2026-12-06). SkyPilot's ~/.lambda_cloud/lambda_keys
    # is not read: an AccountSource names variables and a config table only.
    account=AccountSource(key_var="LAMBDA_API_KEY", url_var="LAMBDA_API_BASE_URL", default_url=DEFAULT_URL),
    # The model in an instance type's gpu_description, "H100 (80 GB PCIe)" (4.3); its GB tells the A100s apart.
    # GPUs the catalog does not know (A10, RTX 6000, GH200, V100, B200) are not offered.
    gpus=GpuSpellings({"RTX_A6000": "A6000", "A100_40GB": "A100", "A100_80GB": "A100", "H100": "H100",
                       "H200": "H200"}),
    # Dedicated on-demand machines, never interrupted: after RunPod and Thunder, before Vast's hosts (2026-12-06).
    preference=25,
)
