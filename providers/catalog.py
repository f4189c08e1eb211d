"""Canonical GPU names and each provider's spelling of them.

Users write ``RTX_4090``, ``H100``, ``A100_80GB`` or ``ANY``; providers spell them their own way (Vast
``"RTX 4090"``, RunPod ``"NVIDIA GeForce RTX 4090"``, Thunder ``h100``; see reference/provider-apis.md). The
``nvidia_smi`` spelling is what ``nvidia-smi --query-gpu=name`` prints, used to check local and SSH boxes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["ANY", "CATALOG", "WHOLE_CARD", "GpuModel", "canonical_gpu", "gpu_model", "identify", "spellings",
           "whole_card_gb"]

ANY = "ANY"

#: The share of a model's memory (``GpuModel.memory_gb``, the maker's figure) an offer must report to count as a
#: whole card. Cards report a little less than that figure, and providers count in MB (Vast's ``gpu_ram`` is MB,
#: reference 1.3): nvidia-smi shows an L4 with 23034 MiB, an L40S or A40 with 46068, a T4 with 15360, so 23.0,
#: 46.1 and 15.4 "GB" against 24, 48 and 16. Part of a card (a shared or partitioned GPU) or a misreport is half
#: of it or less, far below.
WHOLE_CARD = 0.9


@dataclass(frozen=True, slots=True)
class GpuModel:
    name: str
    memory_gb: int
    vast: tuple[str, ...] = ()
    runpod: tuple[str, ...] = ()
    thunder: tuple[str, ...] = ()
    nvidia_smi: tuple[str, ...] = ()

    def matches_smi(self, smi_name: str) -> bool:
        return smi_name.strip() in self.nvidia_smi


def _m(name: str, mem: int, *, vast: str | tuple[str, ...] = (), runpod: str | tuple[str, ...] = (),
       thunder: str | tuple[str, ...] = (), smi: str | tuple[str, ...] = ()) -> GpuModel:
    def tup(x: str | tuple[str, ...]) -> tuple[str, ...]:
        return (x,) if isinstance(x, str) else x

    return GpuModel(name, mem, tup(vast), tup(runpod), tup(thunder), tup(smi))


CATALOG: dict[str, GpuModel] = {
    m.name: m
    for m in (
        _m("RTX_3090", 24, vast="RTX 3090", runpod="NVIDIA GeForce RTX 3090", smi="NVIDIA GeForce RTX 3090"),
        _m("RTX_4090", 24, vast="RTX 4090", runpod="NVIDIA GeForce RTX 4090", smi="NVIDIA GeForce RTX 4090"),
        _m("RTX_5090", 32, vast="RTX 5090", runpod="NVIDIA GeForce RTX 5090", smi="NVIDIA GeForce RTX 5090"),
        _m("RTX_A6000", 48, vast="RTX A6000", runpod="NVIDIA RTX A6000", thunder="a6000", smi="NVIDIA RTX A6000"),
        _m("A40", 48, vast="A40", runpod="NVIDIA A40", smi="NVIDIA A40"),
        _m("L4", 24, vast="L4", runpod="NVIDIA L4", smi="NVIDIA L4"),
        _m("L40S", 48, vast="L40S", runpod="NVIDIA L40S", smi="NVIDIA L40S"),
        _m("T4", 16, vast="Tesla T4", runpod="Tesla T4", smi="Tesla T4"),
        _m("A100_40GB", 40, vast=("A100 PCIE", "A100 SXM4"), runpod="NVIDIA A100-PCIE-40GB",
           smi=("NVIDIA A100-PCIE-40GB", "NVIDIA A100-SXM4-40GB")),
        _m("A100_80GB", 80, vast=("A100 SXM4", "A100 PCIE"), runpod=("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
           thunder="a100xl", smi=("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe")),
        _m("H100", 80, vast=("H100 SXM", "H100 PCIE", "H100 NVL"), runpod=("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"),
           thunder="h100", smi=("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL")),
        _m("H200", 141, vast="H200", runpod="NVIDIA H200", smi="NVIDIA H200"),
    )
}


def canonical_gpu(name: str) -> str:
    """Normalise a user's GPU name (case, spaces, dashes) to its canonical key, or raise with close matches.

    Example:
        >>> canonical_gpu("rtx 4090")
        'RTX_4090'
    """
    key = name.strip().upper().replace(" ", "_").replace("-", "_")
    if key == ANY or key in CATALOG:
        return key
    close = difflib.get_close_matches(key, [*CATALOG, ANY], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(CATALOG)}, ANY"
    raise ConfigError(f"unknown GPU {name!r}{hint}")


def gpu_model(name: str) -> GpuModel | None:
    """The catalog entry for a canonical name (None for ``ANY``)."""
    key = canonical_gpu(name)
    return None if key == ANY else CATALOG[key]


def whole_card_gb(name: str | None) -> float | None:
    """The least GPU memory (GB) an offer of canonical model ``name`` reports when it rents whole cards; None for
    ``ANY``, no GPU, or a name the catalog does not know.

    Example:
        >>> whole_card_gb("RTX_4090")
        21.6
    """
    model = CATALOG.get(name) if name is not None else None
    return None if model is None else round(model.memory_gb * WHOLE_CARD, 1)


def spellings(provider: str, name: str | None) -> tuple[str, ...]:
    """How ``provider`` ("vast", "runpod", "thunder") spells a canonical name; every known GPU for ``ANY``/None."""
    if name in (None, ANY):
        return tuple(dict.fromkeys(s for m in CATALOG.values() for s in getattr(m, provider)))
    return tuple(getattr(CATALOG[canonical_gpu(name)], provider))


def identify(provider: str, spelling: str, *, memory_gb: float | None = None) -> str | None:
    """The canonical name of a provider's GPU spelling, or None if the catalog does not know it.

    Some spellings name two models (Vast ``"A100 SXM4"`` is sold with 40 and 80 GB): ``memory_gb`` then picks the
    one whose memory is nearest.

    Example:
        >>> identify("vast", "A100 SXM4", memory_gb=81.9)
        'A100_80GB'
    """
    found = [m for m in CATALOG.values() if spelling in getattr(m, provider)]
    if not found:
        return None
    if memory_gb is not None:
        found.sort(key=lambda m: abs(m.memory_gb - memory_gb))
    return found[0].name
