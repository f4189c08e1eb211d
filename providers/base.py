"""The one abstraction every provider implements, and the plain data that crosses it.

Providers only speak to their cloud (or box): they list offers, launch, look up, list what this install owns,
and terminate. They never touch the budget, the ledger or the notebook. Capabilities are declared, not found out
by catching ``NotImplementedError``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from .declaration import Capability

if TYPE_CHECKING:
    from ..spec import JobSpec

__all__ = [
    "REMOTE_JOB_ROOT",
    "BootWatch",
    "Capability",
    "Endpoint",
    "Instance",
    "InstanceState",
    "Offer",
    "OfferQuery",
    "OfferRef",
    "Provider",
    "SelfDestruct",
    "SelfDestructing",
    "find_created",
    "self_destruct_of",
    "terminate_confirmed",
]


#: Where jobs live on a remote machine, relative to the login's home (no root needed): ssh boxes and rented ones.
REMOTE_JOB_ROOT = ".cache/burst/jobs"


class InstanceState(str, enum.Enum):
    PENDING = "pending"  # created, not yet reachable (provisioning, pulling the image, booting)
    RUNNING = "running"  # up, with an SSH endpoint
    STOPPED = "stopped"  # paused or stopped (a Vast bid outbid, a RunPod pod exited): still owned
    FAILED = "failed"  # the provider gave up on it (exited on boot, error): still owned until terminated


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How to reach an instance. ``host is None`` means this machine, through a subprocess."""

    host: str | None = None
    port: int = 22
    user: str | None = None
    key_path: str | None = None  # an ephemeral per-job key; None: the user's keys, agent and ~/.ssh/config
    trust_on_first_use: bool = False
    #: A rented instance's own known_hosts file. When set, the host key is pinned there at first contact, only
    #: ``key_path`` is offered, and ~/.ssh/config is not read: a marketplace reuses addresses across renters, so
    #: one global known_hosts would refuse the next instance on the same ip:port as a "changed" host.
    known_hosts: str | None = None

    @property
    def is_local(self) -> bool:
        return self.host is None

    def to_json(self) -> dict[str, Any]:
        """What a reaper needs to reach the instance again (state store handoff)."""
        return {"host": self.host, "port": self.port, "user": self.user, "key_path": self.key_path,
                "trust_on_first_use": self.trust_on_first_use, "known_hosts": self.known_hosts}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Endpoint:
        return cls(host=data["host"], port=data["port"], user=data["user"], key_path=data["key_path"],
                   trust_on_first_use=data["trust_on_first_use"], known_hosts=data.get("known_hosts"))

    def __str__(self) -> str:
        if self.host is None:
            return "local"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port != 22 else ""
        return f"{user}{self.host}{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class OfferQuery:
    """What a job needs. Providers filter on their side where their API can, and on ours where it cannot."""

    gpu_model: str | None = None  # canonical name, ANY, or None (no GPU needed)
    gpus: int = 1
    #: GPU memory per GPU, GB. None: each offer's model in full (a whole card, ``catalog.whole_card_gb``), so an
    #: offer reporting less (part of a card, or a misreport) is left out unless this asks for less.
    memory_gb: int | None = None
    max_price_usd_per_hour: Decimal | None = None  # for the whole instance
    spot: bool = False  # interruptible capacity only (False: on-demand only)
    #: Development capacity allowed too (:attr:`Capability.PROTOTYPING`: cheaper, with limits its offers state);
    #: False: such offers are left out.
    prototyping: bool = False
    min_reliability: float | None = None  # 0..1
    direct_ssh: bool = True  # a public port 22 (marketplaces): burst speaks SSH straight to the instance

    def fits(self, offer: Offer) -> bool:
        """The checks every provider's offers must pass, whatever its API filtered already."""
        from .catalog import ANY

        if self.gpu_model not in (None, ANY) and offer.gpu_model != self.gpu_model:
            return False
        if offer.gpus < self.gpus:
            return False
        if offer.memory_gb is not None and offer.memory_gb < self.memory_floor(offer.gpu_model):
            return False
        if self.max_price_usd_per_hour is not None and offer.price_usd_per_hour > self.max_price_usd_per_hour:
            return False
        if offer.spot != self.spot or (offer.prototyping and not self.prototyping):
            return False
        return self.min_reliability is None or offer.reliability >= self.min_reliability

    def memory_floor(self, model: str | None) -> float:
        """GB per GPU an offer of canonical ``model`` must report: ``memory_gb`` if asked, else a whole card."""
        from .catalog import whole_card_gb

        if self.memory_gb is not None:
            return self.memory_gb
        return whole_card_gb(model) or 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """Something a provider would rent right now, at this price."""

    provider: str
    offer_id: str  # what ``launch`` needs to rent exactly this (Vast ask id, RunPod GPU type@cloud, Thunder spec key)
    gpu_model: str | None  # canonical name (catalog.py), None for a machine without a GPU
    gpus: int
    price_usd_per_hour: Decimal  # for the whole instance, as the provider quotes it now
    memory_gb: int | None = None  # GPU memory per GPU, GB
    reliability: float = 1.0  # 0..1; the provider's own score where it has one
    spot: bool = False
    #: Development capacity (Thunder's prototyping mode): offered only to a query that allows it; its limits are
    #: in ``description``.
    prototyping: bool = False
    #: Which of the provider's products it is, where one GPU is sold as several (RunPod's ``secure`` and
    #: ``community`` cloud, Thunder's ``production`` and ``prototyping`` mode); "" where there is one.
    tier: str = ""
    description: str = ""
    location: str = ""
    #: Provider-specific details ``launch`` needs (a spot bid, a cloud type); never shown, never compared.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def price_per_gpu_hour(self) -> Decimal:
        return self.price_usd_per_hour / self.gpus if self.gpus else self.price_usd_per_hour

    @property
    def ref(self) -> str:
        """How a user names this offer after ``--offer``: ``PROVIDER:ID``, typed or pasted as one word (see
        :class:`OfferRef`)."""
        return str(OfferRef(provider=self.provider, offer_id=_word(self.offer_id),
                            gpus=self.gpus if self.gpus > 1 else None))


_SPACES = re.compile(r"\s+")
_COUNT = re.compile(r"^(?P<id>.+):x(?P<gpus>[1-9][0-9]*)$")


def _word(offer_id: str) -> str:
    # RunPod's ids are GPU type names with spaces ("NVIDIA GeForce RTX 4090"): as one word they can be typed on
    # a magic line or a shell command without quotes. No marketplace id mixes "_" and " " (2026-12-06), so the
    # one-word form names one offer.
    return _SPACES.sub("_", offer_id.strip())


@dataclass(frozen=True, slots=True, kw_only=True)
class OfferRef:
    """``--offer PROVIDER:ID[:xN]``: one offer, as the offer browser shows it. Spaces in the id may be typed as
    ``_``; ``:xN`` names an offer of N GPUs (RunPod prices a GPU type per count, and a Thunder spec has one count,
    so the id alone does not always say how many). An id shown with an ``@PLACE`` (a RunPod cloud, a Lambda
    region) and typed without it names that offer in every place: the cheapest is rented, the next if it is taken
    (``runpod:NVIDIA_GeForce_RTX_4090``, the id before RunPod offers were per cloud, still rents a 4090).

    Example:
        >>> OfferRef.parse("runpod:NVIDIA GeForce RTX 4090:x2")
        OfferRef(provider='runpod', offer_id='NVIDIA_GeForce_RTX_4090', gpus=2)
    """

    provider: str
    offer_id: str
    gpus: int | None = None

    @classmethod
    def parse(cls, text: str) -> OfferRef:
        """Raises ValueError, in words, for anything that is not ``PROVIDER:ID[:xN]``."""
        provider, _, rest = text.strip().partition(":")
        match = _COUNT.match(rest)
        offer_id, gpus = (match["id"], int(match["gpus"])) if match else (rest, None)
        if not provider or not offer_id.strip() or not provider.isidentifier():
            raise ValueError(f"{text!r} is not PROVIDER:ID (e.g. vast:4101, as the offer browser shows it)")
        return cls(provider=provider.lower(), offer_id=_word(offer_id), gpus=gpus)

    def matches(self, offer: Offer) -> bool:
        shown = _word(offer.offer_id)
        same = shown == self.offer_id or ("@" not in self.offer_id and shown.partition("@")[0] == self.offer_id)
        return offer.provider == self.provider and same and (self.gpus is None or offer.gpus == self.gpus)

    def __str__(self) -> str:
        return f"{self.provider}:{self.offer_id}" + (f":x{self.gpus}" if self.gpus is not None else "")


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    """A machine (or, for local and ssh, a private job directory on one) that this install owns."""

    provider: str
    instance_id: str
    state: InstanceState
    endpoint: Endpoint | None  # None until the provider reports a way in (booting)
    workdir: str  # the directory the job owns on the instance
    price_usd_per_hour: Decimal
    tag: str
    gpu_model: str | None = None
    python: str = "python3"  # the interpreter the agent runs under on the instance
    job_id: str | None = None  # the job it was launched for, as the provider recorded it (env, name)
    detail: str = ""  # the provider's own words on its state ("pulling image", "outbid"), for the job view
    spot: bool = False
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))


@dataclass(frozen=True, slots=True, kw_only=True)
class SelfDestruct:
    """How the agent on an instance ends that instance itself, with the credential the provider put there.

    The agent reads the instance id from ``id_env`` and the instance-scoped key from ``key_env`` (its own
    environment first, then PID 1's), puts the id where ``{id}`` stands in ``url`` and in every string of
    ``body`` that is exactly ``"{id}"``, and sends ``method`` with ``Authorization: Bearer <key>`` from inside its
    own process (never a command line). Nothing secret is in the recipe: the key never leaves the instance.
    """

    provider: str
    method: str
    url: str  # absolute, from the provider's own base URL (tests point it at their loopback fakes)
    id_env: str
    key_env: str
    body: Mapping[str, Any] | None = None  # sent as JSON

    def to_json(self) -> dict[str, Any]:
        """The recipe as it goes into the job's manifest."""
        return {"provider": self.provider, "method": self.method, "url": self.url, "id_env": self.id_env,
                "key_env": self.key_env, "body": None if self.body is None else dict(self.body)}


@dataclass(frozen=True, slots=True, kw_only=True)
class BootWatch:
    """The terms of the dead-man's switch a marketplace instance holds from its first second, before any agent
    runs (``_boot_watchdog.py``): what covers a kernel that dies while the instance is created or boots.

    ``lease_seconds``: the job's lease; an instance that no client takes over within it (plus the provider's own
    poll interval, see there) ends itself; 0: never for silence. ``end_by``: the client's wall clock (epoch
    seconds) at which the job's money or its maximum duration runs out, counted from the create request; 0: none.
    """

    lease_seconds: int
    end_by: float


@runtime_checkable
class SelfDestructing(Protocol):
    """What a provider declaring :attr:`Capability.SELF_DESTRUCT` also implements."""

    def self_destruct(self) -> SelfDestruct: ...


@runtime_checkable
class Provider(Protocol):
    """What every provider module implements. All calls are async and may raise :class:`ProviderError`.

    Contracts:
      - ``offers`` returns live offers that fit ``query``, cheapest first; an empty list means none fit.
      - ``launch`` creates one instance labelled with ``tag`` (the owner tag of this install) and returns it
        once the provider has accepted it; the caller waits for SSH separately. A provider that declares
        :attr:`Capability.SELF_DESTRUCT` arms ``watch`` in the create request (others have nothing to arm it with).
      - ``get`` returns the current state, or ``None`` once the instance is gone.
      - ``list_owned`` asks the provider (not memory) for every instance carrying ``tag``.
      - ``terminate`` is idempotent: an unknown or gone id returns quietly. It returns once the provider has
        accepted the request; callers confirm with ``get`` returning ``None``.
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]]
    #: Seconds a terminate usually takes to be confirmed; budgets keep this much money back for teardown.
    teardown_seconds: ClassVar[float]
    #: How often ``get`` may be asked while an instance boots (the provider's rate limits decide; tests lower it).
    poll_seconds: float

    async def offers(self, query: OfferQuery) -> list[Offer]: ...

    async def launch(
        self, offer: Offer, spec: JobSpec, *, job_id: str, tag: str, ssh_public_key: str | None,
        watch: BootWatch | None = None,
    ) -> Instance: ...

    async def get(self, instance_id: str) -> Instance | None: ...

    async def list_owned(self, tag: str) -> list[Instance]: ...

    async def terminate(self, instance_id: str) -> None: ...

    async def aclose(self) -> None:
        """Release what the provider holds open (a marketplace's HTTP client); a no-op where it holds nothing."""
        ...


async def find_created(provider: Provider, *, tag: str, job_id: str, lost: BaseException) -> Instance:
    """After a create call failed with ``lost``: if the provider may have carried it out anyway (the reply never
    came: the connection broke, a timeout; or a 5xx came after the request was sent), the instance it made carries
    this install's tag and the job id, and the job goes on with it. Raises ``lost`` when the failure made nothing
    or none is found (or the list fails too); the job's teardown then looks again."""
    from ..errors import ApiError, ConnectFailed, ProviderError

    if not (isinstance(lost, ConnectFailed) or (isinstance(lost, ApiError) and lost.status >= 500)):
        raise lost
    try:
        mine = [i for i in await provider.list_owned(tag) if i.job_id == job_id]
    except ProviderError:
        raise lost from None
    if not mine:
        raise lost
    return mine[0]


async def terminate_confirmed(provider: Provider, instance_id: str, *, timeout: float) -> BaseException | None:
    """Terminate, then ask until the provider says the instance is gone; retry with backoff until ``timeout``.

    Returns None once confirmed, else the last problem. A destroy counts only when the provider confirms it.
    """
    from ..errors import ProviderError

    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            await provider.terminate(instance_id)
            if await provider.get(instance_id) is None:
                return None
            last: BaseException = ProviderError(f"{instance_id} is still there after terminate")
        except (ProviderError, OSError) as exc:
            last = exc
        if time.monotonic() + delay > deadline:
            return last
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


def self_destruct_of(provider: Provider) -> SelfDestruct | None:
    """The provider's self-destruct recipe, or None when it declares no :attr:`Capability.SELF_DESTRUCT`."""
    if Capability.SELF_DESTRUCT not in provider.capabilities:
        return None
    if not isinstance(provider, SelfDestructing):
        raise TypeError(f"{provider.name} declares self_destruct but has no self_destruct() recipe")
    return provider.self_destruct()
