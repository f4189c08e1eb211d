"""The ``thunder`` provider: Thunder Compute's REST API (reference/provider-apis.md, section 3).

Thunder sells fixed specs keyed ``{gpu}_x{count}_{mode}`` (``h100_x1_production``) at list prices
(``GET /v1/pricing``); ``/v1/specs`` says what each spec is and ``/v1/status`` whether it can be had now. Each mode
is a product of its own, with its own price and capacity: production, a dedicated machine, and prototyping, about
half the price, with CUDA-level virtualisation and GPU processes that "may be interrupted" (reference 3). A
prototyping offer says so (:attr:`Offer.prototyping`, its limits in the description) and fits only a query that
allows it (``--prototyping``). There
are no labels, no spot bids and no billed-rate readback, and the instance list is a map keyed by a small index
that is not stable: the instance id here is the ``uuid``, and its index is looked up again before every delete.

Ownership without labels: the job's public key goes in at create (``public_key``) with the comment
``TAG/JOB_ID``, and ``list_owned`` keeps the instances whose ``sshPublicKeys`` carry a comment starting with
``TAG/``. Whether Thunder keeps a key's comment is UNCONFIRMED (2026-11-23); the state store also records the
uuid right after create, so a stripped comment loses this second way of finding an instance, not the first.

Thunder facts this module decides beyond the reference are marked "(2026-11-23)" where they are used.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import re
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from ..errors import ApiError, ConfigError, ConnectFailed, OfferGone, ProviderError, one_line
from ._http import RETRY_STATUSES, ApiClient, RetryPolicy, money_from_json
from .base import (
    REMOTE_JOB_ROOT,
    BootWatch,
    Capability,
    Endpoint,
    Instance,
    InstanceState,
    Offer,
    OfferQuery,
    find_created,
)
from .catalog import CATALOG
from .thunder_declared import DECLARATION, DEFAULT_URL

if TYPE_CHECKING:
    from ..spec import JobSpec

__all__ = ["DEFAULT_URL", "MODES", "PROTOTYPING_LIMITS", "ThunderProvider", "api_root"]

MODES = ("prototyping", "production")
#: What a prototyping offer's description says of it (reference 3: thunder-cli's disclaimer, the docs' "Development
#: mode"): a user choosing it must see why it is cheaper.
PROTOTYPING_LIMITS = "CUDA-level virtualisation; long-running GPU processes may be interrupted"
INCLUDED_DISK_GB = 100  # "(disk - 100) x disk_gb" (reference 3, thunder-cli utils/pricing.go)
DEFAULT_VCPUS = 4  # included vCPUs when a spec lists no vcpuOptions (thunder-cli)
CATALOG_SECONDS = 60.0  # how long get() reuses the pricing and specs tables
#: Thunder publishes no reliability score (2026-11-23). Production is a dedicated machine; prototyping
#: "may be interrupted" (CLI disclaimer), so it scores lower and ``min_reliability=0.95`` leaves it out.
RELIABILITY = {"production": 0.99, "prototyping": 0.9}
DEFAULT_USER = "ubuntu"  # thunder-cli utils/ssh.go and sshconfig.go (reference 3)
IMAGE_UNSUPPORTED = "thunder runs its own images; --image is not supported"
_SPEC_KEY = re.compile(r"^(?P<gpu>.+)_x(?P<count>\d+)_(?P<mode>[a-z]+)$")
# The wording of a capacity refusal at create is UNCONFIRMED (2026-11-23): any 4xx that says so counts.
_NO_CAPACITY = re.compile(r"capacity|unavailable|not available|out of stock|sold out|temporarily_disabled", re.I)
_STOPPED = frozenset({"STOPPING", "STOPPED"})
# UNKNOWN is the one status of the reference's list that says nothing is coming (2026-11-23): a boot that went
# nowhere. Everything else (PROVISIONING, QUEUED, STARTING, PENDING, MODIFYING, RESTORING, ...) is on its way.
_FAILED = frozenset({"UNKNOWN"})


def api_root(base_url: str) -> str:
    """The ``/v1`` root from ``TNR_API_URL``, which the CLI gives without it and terraform with it."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def _int(value: Any, default: int = 0) -> int:
    """``cpuCores``, ``numGpus`` and ``memory`` come as strings or numbers (reference 3)."""
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def _parse_key(key: str, spec: Mapping[str, Any]) -> tuple[str, int, str] | None:
    """(gpu type, count, mode) of a spec key, the spec's own gpuCount/mode winning over the key's text."""
    match = _SPEC_KEY.match(key)
    if match is None:
        return None
    count = _int(spec.get("gpuCount"), int(match["count"]))
    return match["gpu"], count, str(spec.get("mode") or match["mode"])


def _included_vcpus(spec: Mapping[str, Any]) -> int:
    options = spec.get("vcpuOptions") or []
    return _int(options[0], DEFAULT_VCPUS) if options else DEFAULT_VCPUS


def _memory_gb(gpu_type: str, count: int, spec: Mapping[str, Any]) -> int | None:
    """GPU memory per GPU. ``vramGB`` reads as per GPU: thunder-cli's own fixtures give a100xl_x4 80 GB
    (utils/spec_store_test.go). A value far above one card's memory on a multi-GPU spec is taken as a total."""
    vram = _int(spec.get("vramGB"))
    if vram <= 0:
        return None
    canonical = DECLARATION.gpus.identify(gpu_type)
    if canonical is not None and count > 1 and vram > CATALOG[canonical].memory_gb * 1.5:
        return vram // count
    return vram


def _hourly(pricing: Mapping[str, Any], key: str, spec: Mapping[str, Any], *, vcpus: int, disk_gb: int,
            ephemeral_gb: int = 0) -> Decimal | None:
    """Thunder's list price for a configuration (reference 3): GPU rate + extra vCPUs + disk past 100 GB +
    ephemeral disk. A later thunder-cli includes 100 GB per GPU, not 100 in all: for multi-GPU specs this
    errs high, the safe side for a budget (2026-11-23). None when the table has no rate for the spec."""
    price = money_from_json(pricing.get(key))
    if price is None:
        return None
    extra_vcpus = vcpus - _included_vcpus(spec)
    if extra_vcpus > 0:
        price += extra_vcpus * (money_from_json(pricing.get("additional_vcpus")) or 0)
    if disk_gb > INCLUDED_DISK_GB:
        price += (disk_gb - INCLUDED_DISK_GB) * (money_from_json(pricing.get("disk_gb")) or 0)
    if ephemeral_gb > 0:
        price += ephemeral_gb * (money_from_json(pricing.get("ephemeral_disk_gb")) or 0)
    return price


def _key_lines(raw: Mapping[str, Any]) -> list[str]:
    """``sshPublicKeys``: a list of OpenSSH lines (objects with a ``public_key`` are taken too)."""
    lines = []
    for item in raw.get("sshPublicKeys") or []:
        line = item.get("public_key") if isinstance(item, Mapping) else item
        if isinstance(line, str):
            lines.append(line.strip())
    return lines


def _comment(line: str) -> str:
    parts = line.split(None, 2)
    return parts[2].strip() if len(parts) == 3 else ""


def _owner(raw: Mapping[str, Any], tag: str | None = None) -> tuple[str, str] | None:
    """(tag, job id) from the first key comment shaped ``TAG/JOB_ID`` (with this ``tag`` when given)."""
    for line in _key_lines(raw):
        owner, sep, job_id = _comment(line).partition("/")
        if sep and owner and job_id and (tag is None or owner == tag):
            return owner, job_id
    return None


def _with_comment(public_key: str, comment: str) -> str:
    """The key with our comment in place of its own: ``sshd`` ignores comments, ``list_owned`` reads them."""
    parts = public_key.split()
    if len(parts) < 2:
        raise ConfigError("thunder: the job's SSH public key is not an OpenSSH public key line")
    return f"{parts[0]} {parts[1]} {comment}"


def _is_capacity(exc: ApiError) -> bool:
    if not 400 <= exc.status < 500 or exc.status in (401, 403, 429):
        return False
    try:
        body = json.loads(exc.body)
    except ValueError:
        body = exc.body
    text = " ".join(str(body.get(k) or "") for k in ("error", "message")) if isinstance(body, dict) else str(body)
    return bool(_NO_CAPACITY.search(text))


def _created(raw: Mapping[str, Any]) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(str(raw.get("createdAt")).replace("Z", "+00:00"))
    except ValueError:
        return dt.datetime.now(dt.timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


class ThunderProvider:
    """Thunder Compute: fixed specs at list prices, rented by spec key, reached over SSH as ``ubuntu``.

    ``ssh_user`` overrides ``ubuntu`` (the tests' fake machines log in as the test user). Both modes are offered;
    prototyping only to a query that allows it (:attr:`OfferQuery.prototyping`), because it virtualises CUDA (a
    job's own CUDA libraries may misbehave under it) and its GPU processes "may be interrupted" (thunder-cli),
    while burst otherwise promises a cell that runs to the end.
    """

    name: ClassVar[str] = DECLARATION.name
    capabilities: ClassVar[frozenset[Capability]] = DECLARATION.capabilities  # no CUSTOM_IMAGE: see launch
    teardown_seconds: ClassVar[float] = 30.0  # a delete is one call; the list drops the instance soon after

    def __init__(self, *, api_key: str, base_url: str = DEFAULT_URL, client: httpx.AsyncClient | None = None,
                 retry: RetryPolicy | None = None, ssh_user: str | None = None, poll_seconds: float = 5.0,
                 disk_gb: int = 100, template: str = "base") -> None:
        self._api = ApiClient(self.name, base_url=api_root(base_url), token=api_key, client=client, retry=retry)
        self.ssh_user = ssh_user
        self.poll_seconds = poll_seconds
        self.disk_gb = max(disk_gb, INCLUDED_DISK_GB)  # 100 GB is the smallest disk the specs allow
        self.template = template
        self._catalog: tuple[float, dict[str, Any], dict[str, Any]] | None = None  # (when, pricing, specs)
        # Our own deletes one at a time: each resolves an index that another delete may renumber.
        self._delete_lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self._api.aclose()

    # -- catalog ---------------------------------------------------------------------------------------------

    async def _table(self, path: str, field: str, *, interactive: bool = False) -> dict[str, Any]:
        reply = await self._api.json("GET", path, interactive=interactive)
        table = reply.get(field) if isinstance(reply, Mapping) else None
        return dict(table) if isinstance(table, Mapping) else {}

    async def _tables(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Pricing and specs, fetched at most once a minute for get() and list_owned()."""
        if self._catalog is None or time.monotonic() - self._catalog[0] > CATALOG_SECONDS:
            pricing, specs = await asyncio.gather(self._table("/pricing", "pricing"), self._table("/specs", "specs"))
            self._catalog = (time.monotonic(), pricing, specs)
        return self._catalog[1], self._catalog[2]

    async def offers(self, query: OfferQuery) -> list[Offer]:
        """One offer per available spec of exactly ``query.gpus`` GPUs, in either mode, cheapest first.

        Exactly: a job asking for 1 GPU is not quietly moved to a 2-GPU machine at twice the price when the
        1-GPU spec is out. Spot queries get nothing: Thunder has no interruptible capacity for sale.
        """
        if query.spot:
            return []
        pricing, specs, status = await asyncio.gather(
            *(self._table(path, field, interactive=True)
              for path, field in (("/pricing", "pricing"), ("/specs", "specs"), ("/status", "specs"))))
        self._catalog = (time.monotonic(), pricing, specs)
        found = []
        for key, spec in specs.items():
            # No availability at all fails open, as thunder-cli does (utils/spec_store.go): create then says.
            if not isinstance(spec, Mapping) or (status and status.get(key) != "available"):
                continue
            offer = self._offer(key, spec, pricing)
            if offer is not None and offer.gpus == max(query.gpus, 1) and query.fits(offer):
                found.append(offer)
        return sorted(found, key=lambda o: (o.price_usd_per_hour, -o.reliability, o.offer_id))

    def _offer(self, key: str, spec: Mapping[str, Any], pricing: Mapping[str, Any]) -> Offer | None:
        parsed = _parse_key(key, spec)
        if parsed is None or parsed[2] not in MODES:
            return None
        gpu_type, count, mode = parsed
        memory = _memory_gb(gpu_type, count, spec)
        model = DECLARATION.gpus.identify(gpu_type, memory_gb=memory)
        storage: Mapping[str, Any] = spec.get("storageGB") or {}
        disk = max(self.disk_gb, _int(storage.get("min"), INCLUDED_DISK_GB))
        if model is None or (_int(storage.get("max")) and disk > _int(storage.get("max"))):
            return None
        vcpus = _included_vcpus(spec)  # the included count: production allows no other (thunder-cli create.go)
        price = _hourly(pricing, key, spec, vcpus=vcpus, disk_gb=disk)
        if price is None:
            return None
        name = spec.get("displayName") or gpu_type
        limits = f"; {PROTOTYPING_LIMITS}" if mode == "prototyping" else ""
        return Offer(provider=self.name, offer_id=key, gpu_model=model, gpus=count, price_usd_per_hour=price,
                     memory_gb=memory, reliability=RELIABILITY[mode], spot=False,
                     prototyping=mode == "prototyping", tier=mode,
                     description=f"{count} x {name} ({mode}, {vcpus} vCPU, {disk} GB disk{limits})",
                     extra={"gpu_type": gpu_type, "num_gpus": count, "mode": mode, "cpu_cores": vcpus,
                            "disk_size_gb": disk})

    # -- instances -------------------------------------------------------------------------------------------

    async def launch(self, offer: Offer, spec: JobSpec, *, job_id: str, tag: str,
                     ssh_public_key: str | None, watch: BootWatch | None = None) -> Instance:
        """Create the instance for ``offer`` with the job's key. Never retried after the request may have
        reached Thunder (a second create would rent a second machine): a lost reply is found by its key.
        ``watch`` is not armed: Thunder puts no instance-scoped key on an instance to end it with."""
        if spec.image is not None:
            raise ConfigError(IMAGE_UNSUPPORTED)
        if not ssh_public_key:
            # Without one Thunder generates a key pair and hands back the private half, which burst never keeps.
            raise ConfigError("thunder: launch needs the job's SSH public key")
        extra = offer.extra
        body = {"cpu_cores": extra["cpu_cores"], "mode": extra["mode"], "template": self.template,
                "gpu_type": extra["gpu_type"], "num_gpus": extra["num_gpus"],
                "disk_size_gb": extra.get("disk_size_gb", self.disk_gb), "ephemeral_disk_gb": 0,
                "public_key": _with_comment(ssh_public_key, f"{tag}/{job_id}")}
        try:
            reply = await self._api.json("POST", "/instances/create", json=body, idempotent=False)
        except ProviderError as exc:
            if isinstance(exc, ApiError) and _is_capacity(exc):
                # /v1/status said available a moment ago: this offer went, the next one may not have.
                raise OfferGone(f"thunder: {offer.offer_id} is out of capacity: "
                                f"{one_line(exc, about=self.name)}") from exc
            return await find_created(self, tag=tag, job_id=job_id, lost=exc)  # by its key's comment TAG/JOB_ID
        # The reply's "key" (a private key Thunder may generate) is dropped here: never kept, never logged.
        uuid = reply.get("uuid") if isinstance(reply, Mapping) else None
        if not isinstance(uuid, str) or not uuid:
            raise ProviderError("thunder: the create call answered without an instance uuid")
        # Thunder has no billed-rate readback: the price is the list price the offer was made at.
        return Instance(provider=self.name, instance_id=uuid, state=InstanceState.PENDING, endpoint=None,
                        workdir=f"{REMOTE_JOB_ROOT}/{job_id}", price_usd_per_hour=offer.price_usd_per_hour,
                        tag=tag, gpu_model=offer.gpu_model, job_id=job_id, detail="PROVISIONING")

    async def _list(self, *, update_ips: bool = False) -> dict[str, Mapping[str, Any]]:
        """index -> instance. The index is only good until the next delete anywhere on the account."""
        # update_ips: what thunder-cli sends before it connects (reference 3); only get() needs fresh IPs.
        reply = await self._api.json("GET", "/instances/list", params={"update_ips": "true"} if update_ips else None)
        if isinstance(reply, list):  # a list instead of the documented map: its positions are the indexes
            reply = {str(i): row for i, row in enumerate(reply)}
        if not isinstance(reply, Mapping):
            return {}
        return {str(k): v for k, v in reply.items() if isinstance(v, Mapping)}

    async def get(self, instance_id: str) -> Instance | None:
        for raw in (await self._list(update_ips=True)).values():
            if raw.get("uuid") == instance_id:
                return await self._instance(raw)
        return None

    async def list_owned(self, tag: str) -> list[Instance]:
        """Instances whose key comment says ``TAG/JOB_ID``: the only owner mark Thunder keeps (if it keeps it)."""
        return [await self._instance(raw) for raw in (await self._list()).values() if _owner(raw, tag)]

    async def _instance(self, raw: Mapping[str, Any]) -> Instance:
        status = str(raw.get("status") or "").upper()
        ip = str(raw.get("ip") or "").strip()
        endpoint = None
        detail = status
        if status == "RUNNING" and ip:
            state = InstanceState.RUNNING
            endpoint = Endpoint(host=ip, port=_int(raw.get("port")) or 22, user=self.ssh_user or DEFAULT_USER)
        elif status in _STOPPED:
            state = InstanceState.STOPPED
        elif status in _FAILED:
            state = InstanceState.FAILED
        else:
            state = InstanceState.PENDING
            if status == "RUNNING":
                detail = "RUNNING, no IP yet"
        owner = _owner(raw)
        gpu_type = str(raw.get("gpuType") or "")
        return Instance(provider=self.name, instance_id=str(raw.get("uuid")), state=state, endpoint=endpoint,
                        workdir=f"{REMOTE_JOB_ROOT}/{owner[1]}" if owner else REMOTE_JOB_ROOT,
                        price_usd_per_hour=await self._price(raw), tag=owner[0] if owner else "",
                        gpu_model=DECLARATION.gpus.identify(gpu_type), job_id=owner[1] if owner else None,
                        detail=detail, created_at=_created(raw))

    async def _price(self, raw: Mapping[str, Any]) -> Decimal:
        """The list price of what the instance is. 0 when the table no longer has its spec (a retired SKU):
        the caller's own record of the launch price stays the one the budget uses."""
        pricing, specs = await self._tables()
        key = f"{raw.get('gpuType')}_x{_int(raw.get('numGpus'), 1)}_{raw.get('mode')}"
        spec: Mapping[str, Any] = specs.get(key) or {}
        price = _hourly(pricing, key, spec, vcpus=_int(raw.get("cpuCores")), disk_gb=_int(raw.get("storage")),
                        ephemeral_gb=_int(raw.get("ephemeralDiskGB")))
        return price if price is not None else Decimal(0)

    async def _index_of(self, instance_id: str) -> str | None:
        for index, raw in (await self._list()).items():
            if raw.get("uuid") == instance_id:
                return index
        return None

    async def terminate(self, instance_id: str) -> None:
        """Delete by uuid: find its index now, delete that index; gone already is fine.

        The delete is sent as not idempotent, and every retry finds the index again: after a 5xx, a timeout or
        a 404 the instance may be gone and the index renumbered, so resending the same index could delete
        another instance (2026-11-23: whether Thunder reuses indexes is UNCONFIRMED; the fake renumbers).
        """
        policy = self._api.retry
        problem: Exception | None = None
        async with self._delete_lock:
            for attempt in range(policy.attempts):
                index = await self._index_of(instance_id)
                if index is None:
                    return
                try:
                    await self._api.request("POST", f"/instances/{index}/delete", idempotent=False)
                    return
                except ApiError as exc:
                    if exc.status != 404 and exc.status not in RETRY_STATUSES:
                        raise
                    problem = exc
                except ConnectFailed as exc:
                    problem = exc
                ceiling = min(policy.max_sleep_seconds, policy.base_seconds * 2**attempt)
                await asyncio.sleep(random.uniform(0, ceiling))
        raise ProviderError(f"thunder: could not delete {instance_id}: {problem}")
