"""Canonical GPU names, and the type of a provider's spellings of them.

Users write ``RTX_4090``, ``H100``, ``A100_80GB`` or ``ANY``; providers spell them their own way (Vast
``"RTX 4090"``, RunPod ``"NVIDIA GeForce RTX 4090"``, Thunder ``h100``; see reference/provider-apis.md). Each
provider declares its own spellings (a :class:`GpuSpellings` in its declaration); the ``nvidia_smi`` spelling here
is what ``nvidia-smi --query-gpu=name`` prints, used to check local and SSH boxes.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["ANY", "CATALOG", "WHOLE_CARD", "GpuModel", "GpuSpellings", "canonical_gpu", "gpu_model",
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
    nvidia_smi: tuple[str, ...] = ()

    def matches_smi(self, smi_name: str) -> bool:
        return smi_name.strip() in self.nvidia_smi


def _spellings(spelled: str | tuple[str, ...]) -> tuple[str, ...]:
    return (spelled,) if isinstance(spelled, str) else spelled


def _m(name: str, mem: int, smi: str | tuple[str, ...]) -> GpuModel:
    return GpuModel(name, mem, _spellings(smi))


CATALOG: dict[str, GpuModel] = {
    m.name: m
    for m in (
        _m("RTX_3090", 24, "NVIDIA GeForce RTX 3090"),
        _m("RTX_4090", 24, "NVIDIA GeForce RTX 4090"),
        _m("RTX_5090", 32, "NVIDIA GeForce RTX 5090"),
        _m("RTX_A6000", 48, "NVIDIA RTX A6000"),
        _m("A40", 48, "NVIDIA A40"),
        _m("L4", 24, "NVIDIA L4"),
        _m("L40S", 48, "NVIDIA L40S"),
        _m("T4", 16, "Tesla T4"),
        _m("A100_40GB", 40, ("NVIDIA A100-PCIE-40GB", "NVIDIA A100-SXM4-40GB")),
        _m("A100_80GB", 80, ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe")),
        _m("H100", 80, ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL")),
        _m("H200", 141, "NVIDIA H200"),
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


class GpuSpellings:
    """One provider's names for catalog GPUs: canonical name -> its spellings there (one, or a tuple of several).

    Example:
        >>> vast = GpuSpellings({"A100_40GB": ("A100 PCIE", "A100 SXM4"), "A100_80GB": ("A100 SXM4", "A100 PCIE")})
        >>> vast.of("A100_80GB"), vast.identify("A100 SXM4", memory_gb=81.9)
        (('A100 SXM4', 'A100 PCIE'), 'A100_80GB')
    """

    __slots__ = ("_names",)

    def __init__(self, names: Mapping[str, str | tuple[str, ...]]) -> None:
        unknown = [name for name in names if name not in CATALOG]
        if unknown:
            raise ValueError(f"GPU spellings for {', '.join(unknown)}: not in the catalog")
        # In catalog order, whatever order they were written in: ``identify`` without a memory size takes the
        # first model that has the spelling, and ``of(ANY)`` lists them in this order.
        self._names = {m: _spellings(names[m]) for m in CATALOG if m in names}

    def of(self, name: str | None) -> tuple[str, ...]:
        """How this provider spells a canonical name; every GPU it knows for ``ANY``/None."""
        if name in (None, ANY):
            return tuple(dict.fromkeys(s for spelled in self._names.values() for s in spelled))
        return self._names.get(canonical_gpu(name), ())

    def identify(self, spelling: str, *, memory_gb: float | None = None) -> str | None:
        """The canonical name of one of this provider's spellings, or None if the catalog does not know it.

        Some spellings name two models (Vast ``"A100 SXM4"`` is sold with 40 and 80 GB): ``memory_gb`` then picks
        the one whose memory is nearest."""
        found = [CATALOG[m] for m, spelled in self._names.items() if spelling in spelled]
        if not found:
            return None
        if memory_gb is not None:
            found.sort(key=lambda m: abs(m.memory_gb - memory_gb))
        return found[0].name
