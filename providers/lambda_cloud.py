"""The ``lambda`` provider: Lambda Cloud's REST API (reference/provider-apis.md, section 4). The module is not
called ``lambda``: that is a Python keyword.

Lambda rents whole machines by instance type (``gpu_1x_h100_sxm5``) at a list price per instance
(``price_cents_per_hour``), in the regions ``GET /instance-types`` lists as having capacity now (4.3): one offer
per type and region, so a launch refused for capacity moves on to the next region. Every body is
``{"data": ...}`` and every error ``{"error": {"code", "message", "suggestion"}}``; only ``code`` is read (4.1).
A 429 is Cloudflare's plain text (4.2), retried by :class:`~._http.ApiClient` with a policy sized for Lambda's
one launch per 12 s.

SSH keys are account-wide (4.8): a launch names exactly one key already in the account. Each job registers its
own public key under a name that carries the owner tag, the job id and the time, launches with it, and deletes it
once the instance is confirmed gone (``get`` answering None). A key left behind is a leak: anyone in the account
could launch with it. So a launch that made nothing deletes its key at once, ``terminate`` learns the key of an
instance it was not told about (a reaper's fresh provider), and ``list_owned`` (the orphan pass) deletes this
install's keys that no instance uses once they are older than :data:`KEY_GRACE_SECONDS`.

Ownership: the instance carries the tag twice, in ``tags`` (1.10.0) and in ``name`` = ``TAG/JOB_ID``; there is no
server-side filter, so ``list_owned`` filters ``GET /instances`` here (4.5, 4.10). No self-destruct: Lambda puts no
credential on an instance, and the account key must never go there (4.10).

Lambda facts this module decides beyond the reference are marked "(2026-12-06)" where they are used.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from ..errors import ApiError, ConfigError, ConnectFailed, OfferGone, ProviderError, one_line
from ._http import ApiClient, RetryPolicy, default_error_text, money_from_json
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
from .lambda_cloud_declared import DECLARATION, DEFAULT_URL

if TYPE_CHECKING:
    from ..spec import JobSpec

__all__ = ["DEFAULT_URL", "KEY_GRACE_SECONDS", "LambdaProvider", "api_root", "parse_gpu"]

DEFAULT_USER = "ubuntu"  # SkyPilot, dstack and Lambda's tutorials (4.6)
SSH_PORT = 22  # Lambda gives no other (4.6)
IMAGE_UNSUPPORTED = "lambda boots its own Lambda Stack image; --image is not supported"
OWNER_TAG = "burst-owner"  # tag keys match ^[a-z][a-z0-9-:]+$ (4.4)
JOB_TAG = "burst-job"
#: Lambda publishes no reliability score (2026-12-06). Its instances are dedicated and on demand, never
#: interruptible (4.3): scored as Thunder's production machines.
RELIABILITY = 0.99
#: A key of this install that no instance uses is a leak once it is older than this: a launch uses its key within
#: seconds of registering it, or a minute and a half of 429 retries (2026-12-06). Keys carry no creation time at
#: Lambda (4.8 lists id, name, public_key), so the time is in the name.
KEY_GRACE_SECONDS = 600.0
#: Lambda allows one request a second and one launch per 12 s (4.2), and answers a 429 with no Retry-After. As
#: SkyPilot does, back off long enough for the launch budget to refill: ceilings 1, 2, 4, 8, 12 s... (2026-12-06).
RETRY = RetryPolicy(attempts=8, base_seconds=1.0, max_sleep_seconds=12.0)

# "8x A100 (80 GB SXM4)", "H100 (80 GB PCIe)", "A10 (24 GB PCIe)" (4.3).
_DESCRIPTION = re.compile(r"^\s*(?:(?P<count>\d+)\s*x\s+)?(?P<model>.+?)\s*\(\s*(?P<memory>\d+)\s*GB\b", re.I)
_TYPE_COUNT = re.compile(r"^[a-z]+_(?P<count>\d+)x_")
_GONE = frozenset({"terminated"})
# 4.5: ``terminating`` never comes back; ``preempted`` is Lambda taking it (what causes it is UNCONFIRMED): both
# read as stopped, still owned until terminated, as a Vast bid that was outbid (2026-12-06).
_STOPPED = frozenset({"terminating", "preempted"})
_CAPACITY = "instance-operations/launch/insufficient-capacity"


def api_root(base_url: str) -> str:
    """The ``/api/v1`` root from a base URL given with or without it."""
    base = base_url.rstrip("/")
    return base if base.endswith("/api/v1") else f"{base}/api/v1"


def parse_gpu(description: str) -> tuple[int | None, str, int] | None:
    """(count if written, model, GB per GPU) from ``"8x A100 (80 GB SXM4)"`` or ``"A10 (24 GB PCIe)"``.

    Example:
        >>> parse_gpu("8x H100 (80 GB SXM5)")
        (8, 'H100', 80)
    """
    match = _DESCRIPTION.match(description or "")
    if match is None:
        return None
    count = int(match["count"]) if match["count"] else None
    return count, match["model"].strip(), int(match["memory"])


def _canonical(model: str, memory_gb: int) -> str | None:
    return DECLARATION.gpus.identify(model.upper(), memory_gb=memory_gb)


def _error_text(response: httpx.Response) -> str:
    """``message (code)`` and the suggestion from Lambda's error envelope; a 429 is plain text (4.1, 4.2)."""
    try:
        body = response.json()
    except ValueError:
        return default_error_text(response)
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        return default_error_text(response)
    text = f"{error.get('message') or 'error'} ({error.get('code') or 'no code'})"
    suggestion = error.get("suggestion")
    return f"{text}; {suggestion}"[:300] if isinstance(suggestion, str) and suggestion else text[:300]


def _code(exc: ApiError) -> str:
    """The error's ``code``, the one part Lambda says to switch on (4.1); "" when the body has none."""
    try:
        body = json.loads(exc.body)
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, Mapping) else None
    return str(error.get("code") or "") if isinstance(error, Mapping) else ""


def _data(reply: Any) -> Any:
    return reply.get("data") if isinstance(reply, Mapping) else None


def _owner(raw: Mapping[str, Any], tag: str | None = None) -> tuple[str, str] | None:
    """(tag, job id) from the instance's tags, else from its name ``TAG/JOB_ID``; with ``tag``, only that one."""
    tags = {str(t.get("key")): str(t.get("value")) for t in raw.get("tags") or [] if isinstance(t, Mapping)}
    owner, job_id = tags.get(OWNER_TAG), tags.get(JOB_TAG)
    if not (owner and job_id):
        owner, sep, job_id = str(raw.get("name") or "").partition("/")
        if not (sep and owner and job_id):
            return None
    return (owner, job_id) if tag is None or owner == tag else None


@dataclass(frozen=True)
class _Key:
    name: str
    key_id: str | None  # None: not known yet (looked up by name before the delete)


def _key_name(tag: str, job_id: str, now: float) -> str:
    """``TAG-JOB_ID-EPOCH``: at most 14 + 33 + 11 characters of the 64 Lambda allows (4.8)."""
    return f"{tag}-{job_id}-{int(now)}"[:64]


def _key_born(name: str, tag: str) -> float | None:
    """When a key of this install was registered (from its name), or None when it is not one of ours."""
    if not name.startswith(f"{tag}-"):
        return None
    stamp = name.rpartition("-")[2]
    return float(stamp) if stamp.isdigit() else None


class LambdaProvider:
    """Lambda Cloud: whole instances by type and region at list prices, reached over SSH as ``ubuntu``:22.

    ``ssh_user`` overrides ``ubuntu`` (the tests' fake machines log in as the test user). ``clock`` gives the
    time a key is named with and the grace of the leftover-key sweep is counted on (tests pass their own).
    """

    name: ClassVar[str] = DECLARATION.name
    capabilities: ClassVar[frozenset[Capability]] = DECLARATION.capabilities  # no CUSTOM_IMAGE: see launch
    teardown_seconds: ClassVar[float] = 30.0  # billing stops at the terminate request (4.9), as on Thunder

    def __init__(self, *, api_key: str, base_url: str = DEFAULT_URL, client: httpx.AsyncClient | None = None,
                 retry: RetryPolicy | None = None, ssh_user: str | None = None, poll_seconds: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._api = ApiClient(self.name, base_url=api_root(base_url), token=api_key, client=client,
                              retry=retry or RETRY, error_text=_error_text)
        self.ssh_user = ssh_user
        self.poll_seconds = poll_seconds  # at most about 1 request/s (4.2): 5 s leaves room for the rest
        self._clock = clock
        self._keys: dict[str, _Key] = {}  # instance id -> the job key it was launched with, deleted once it is gone

    async def aclose(self) -> None:
        await self._api.aclose()

    # -- offers ----------------------------------------------------------------------------------------------

    async def offers(self, query: OfferQuery) -> list[Offer]:
        """One offer per instance type of exactly ``query.gpus`` GPUs and per region with capacity, cheapest first.

        Exactly, as on Thunder: a 1-GPU job is not moved to an 8-GPU machine at eight times the price. Spot
        queries get nothing: Lambda sells no interruptible capacity.
        """
        if query.spot:
            return []
        types = _data(await self._api.json("GET", "/instance-types", interactive=True))
        found = []
        for name, entry in (types.items() if isinstance(types, Mapping) else ()):
            if not isinstance(entry, Mapping):
                continue
            for region in entry.get("regions_with_capacity_available") or []:
                offer = self._offer(str(name), entry.get("instance_type") or {}, region)
                if offer is not None and offer.gpus == max(query.gpus, 1) and query.fits(offer):
                    found.append(offer)
        return sorted(found, key=lambda o: (o.price_usd_per_hour, o.offer_id))

    def _offer(self, name: str, kind: Mapping[str, Any], region: Any) -> Offer | None:
        region_name = str(region.get("name") or "") if isinstance(region, Mapping) else ""
        parsed = parse_gpu(str(kind.get("gpu_description") or "")) or parse_gpu(str(kind.get("description") or ""))
        cents = money_from_json(kind.get("price_cents_per_hour"))  # an int in 1.10.0, a string in 1.4.0 (4.3)
        if parsed is None or cents is None or not region_name:
            return None
        written, model, memory = parsed
        specs: Mapping[str, Any] = kind.get("specs") or {}
        type_count = _TYPE_COUNT.match(name)
        gpus = int(specs.get("gpus") or 0) or (int(type_count["count"]) if type_count else written or 1)
        canonical = _canonical(model, memory)
        if canonical is None:
            return None
        where = region.get("description") or region_name
        # The id is TYPE@REGION (2026-12-06): one word, so --offer takes it as the browser shows it, and the region
        # is part of what is rented (a launch names both, 4.4).
        return Offer(provider=self.name, offer_id=f"{name}@{region_name}", gpu_model=canonical, gpus=gpus,
                     price_usd_per_hour=cents / 100, memory_gb=memory, reliability=RELIABILITY, spot=False,
                     description=str(kind.get("description") or name), location=str(where),
                     extra={"instance_type_name": name, "region_name": region_name})

    # -- keys ------------------------------------------------------------------------------------------------

    async def _register_key(self, tag: str, job_id: str, public_key: str) -> _Key:
        """The job's public key in the account, under a name of this install; a lost reply that made it anyway
        comes back as "Key name must be unique" (4.8) and is looked up by name."""
        name = _key_name(tag, job_id, self._clock())
        try:
            reply = await self._api.json("POST", "/ssh-keys", json={"name": name, "public_key": public_key},
                                         idempotent=True)
        except ApiError as exc:
            if exc.status != 400:
                raise
            same = [k for k in await self._account_keys() if k.get("name") == name
                    and str(k.get("public_key") or "").split()[:2] == public_key.split()[:2]]
            if not same:
                raise
            return _Key(name, str(same[0].get("id")))
        key_id = (_data(reply) or {}).get("id")
        return _Key(name, str(key_id) if key_id else None)

    async def _account_keys(self) -> list[Mapping[str, Any]]:
        keys = _data(await self._api.json("GET", "/ssh-keys"))
        return [k for k in keys if isinstance(k, Mapping)] if isinstance(keys, list) else []

    async def _delete_key(self, key: _Key) -> None:
        """By id (4.8), looked up by name when not known; an unknown id (gone already) is fine."""
        ids = [key.key_id] if key.key_id else [str(k.get("id")) for k in await self._account_keys()
                                                if k.get("name") == key.name]
        for key_id in ids:
            try:
                await self._api.request("DELETE", f"/ssh-keys/{key_id}")
            except ApiError as exc:
                if exc.status != 404:
                    raise

    async def _drop_key(self, key: _Key) -> None:
        """Best effort where another error is already on its way out: the sweep in ``list_owned`` is the backstop."""
        try:
            await self._delete_key(key)
        except ProviderError:
            pass

    # -- instances -------------------------------------------------------------------------------------------

    async def launch(self, offer: Offer, spec: JobSpec, *, job_id: str, tag: str,
                     ssh_public_key: str | None, watch: BootWatch | None = None) -> Instance:
        """Register the job's key, launch ``offer``'s type in its region with it and the owner tag. Never resent
        after the request may have reached Lambda (a second launch would rent a second machine): a lost reply is
        found by its tag. ``watch`` is not armed: Lambda puts no credential on an instance to end it with."""
        if spec.image is not None:
            raise ConfigError(IMAGE_UNSUPPORTED)
        if not ssh_public_key:
            # Without one, Lambda's launch has no key to name: it takes exactly one, already in the account (4.4).
            raise ConfigError("lambda: launch needs the job's SSH public key")
        key = await self._register_key(tag, job_id, ssh_public_key)
        body = {"region_name": offer.extra["region_name"], "instance_type_name": offer.extra["instance_type_name"],
                "ssh_key_names": [key.name], "name": f"{tag}/{job_id}"[:64],
                "tags": [{"key": OWNER_TAG, "value": tag}, {"key": JOB_TAG, "value": job_id}]}
        # No "quantity": 1.10.0 dropped it, and more than one is refused (4.4).
        try:
            reply = await self._api.json("POST", "/instance-operations/launch", json=body, idempotent=False)
        except ProviderError as exc:
            if not (isinstance(exc, ConnectFailed) or (isinstance(exc, ApiError) and exc.status >= 500)):
                # Refused (4xx, a 401/403, a 429 past the retries): nothing was made, so the key goes now.
                await self._drop_key(key)
                if isinstance(exc, ApiError) and _code(exc) == _CAPACITY:
                    # /instance-types listed the region a moment ago: taken since; the next offer may not be.
                    raise OfferGone(f"lambda: {offer.offer_id} is out of capacity: "
                                    f"{one_line(exc, about=self.name)}") from exc
                raise
            # Lost or 5xx: the instance may exist, and then it holds the key until it is confirmed gone.
            found = await find_created(self, tag=tag, job_id=job_id, lost=exc)
            self._keys[found.instance_id] = key
            return found
        ids = (_data(reply) or {}).get("instance_ids") or []
        if not ids or not isinstance(ids[0], str):
            raise ProviderError("lambda: the launch answered without an instance id")
        self._keys[ids[0]] = key
        # The rate is the list price the offer was made at; the instance row carries the same (4.9).
        return Instance(provider=self.name, instance_id=ids[0], state=InstanceState.PENDING, endpoint=None,
                        workdir=f"{REMOTE_JOB_ROOT}/{job_id}", price_usd_per_hour=offer.price_usd_per_hour,
                        tag=tag, gpu_model=offer.gpu_model, job_id=job_id, detail="booting")

    async def _row(self, instance_id: str) -> Mapping[str, Any] | None:
        """The instance's row, or None when Lambda says it does not exist (404, 4.5)."""
        try:
            reply = await self._api.json("GET", f"/instances/{instance_id}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        row = _data(reply)
        return row if isinstance(row, Mapping) else None

    async def get(self, instance_id: str) -> Instance | None:
        """The instance, or None once it is gone (404 or ``terminated``, 4.5); then its job key is deleted."""
        row = await self._row(instance_id)
        if row is not None:
            self._learn_key(row)
        if row is None or str(row.get("status") or "") in _GONE:
            key = self._keys.pop(instance_id, None)
            if key is not None:
                await self._drop_key(key)
            return None
        return self._instance(row)

    async def list_owned(self, tag: str) -> list[Instance]:
        """Instances carrying ``tag`` (tags or name; no server-side filter, 4.5). The orphan pass: this install's
        keys that no instance uses, past :data:`KEY_GRACE_SECONDS`, are deleted on the way."""
        rows = _data(await self._api.json("GET", "/instances"))
        rows = [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []
        mine = [self._instance(r) for r in rows if _owner(r, tag) and str(r.get("status") or "") not in _GONE]
        await self._sweep_keys(tag, rows)
        return mine

    async def _sweep_keys(self, tag: str, rows: list[Mapping[str, Any]]) -> None:
        in_use = {str(n) for r in rows if str(r.get("status") or "") not in _GONE for n in r.get("ssh_key_names") or []}
        try:
            for key in await self._account_keys():
                name = str(key.get("name") or "")
                born = _key_born(name, tag)
                if born is not None and name not in in_use and self._clock() - born > KEY_GRACE_SECONDS:
                    await self._delete_key(_Key(name, str(key.get("id"))))
        except ProviderError:
            pass  # the instances are the answer; the keys wait for the next pass

    def _learn_key(self, raw: Mapping[str, Any]) -> None:
        """The key an instance was launched with, so that a provider that did not launch it (a reaper's, a
        reconciliation's) deletes it too once the instance is gone."""
        names = [str(n) for n in raw.get("ssh_key_names") or []]
        if names:
            self._keys.setdefault(str(raw.get("id")), _Key(names[0], None))

    def _instance(self, raw: Mapping[str, Any]) -> Instance:
        self._learn_key(raw)
        status = str(raw.get("status") or "")
        ip = str(raw.get("ip") or "").strip()
        instance_id = str(raw.get("id"))
        endpoint = None
        detail = status
        if status == "active" and ip:
            state = InstanceState.RUNNING
            endpoint = Endpoint(host=ip, port=SSH_PORT, user=self.ssh_user or DEFAULT_USER)
        elif status in _STOPPED:
            state = InstanceState.STOPPED
        else:
            # booting, unhealthy (SkyPilot reads it as still starting, 4.5; the provision timeout bounds a boot
            # that never recovers, 2026-12-06), or active with no ip yet.
            state = InstanceState.PENDING
            if status == "active":
                detail = "active, no IP yet"
        owner = _owner(raw)
        kind: Mapping[str, Any] = raw.get("instance_type") or {}
        cents = money_from_json(kind.get("price_cents_per_hour"))
        parsed = parse_gpu(str(kind.get("gpu_description") or "")) or parse_gpu(str(kind.get("description") or ""))
        return Instance(provider=self.name, instance_id=instance_id, state=state, endpoint=endpoint,
                        workdir=f"{REMOTE_JOB_ROOT}/{owner[1]}" if owner else REMOTE_JOB_ROOT,
                        price_usd_per_hour=cents / 100 if cents is not None else Decimal(0),
                        tag=owner[0] if owner else "", gpu_model=_canonical(parsed[1], parsed[2]) if parsed else None,
                        job_id=owner[1] if owner else None, detail=detail)

    async def terminate(self, instance_id: str) -> None:
        """Ask Lambda to terminate; gone already (404) is fine. An instance this provider has not seen is read
        first, so that its key is known and deleted once ``get`` confirms the instance gone (4.8)."""
        if instance_id not in self._keys:
            row = await self._row(instance_id)
            if row is None:
                return
            self._learn_key(row)
        try:
            # Safe to resend: what a repeat terminate answers is UNCONFIRMED (4.7), but the instance is going either
            # way, and a 404 (gone) is taken as done (2026-12-06).
            await self._api.request("POST", "/instance-operations/terminate", json={"instance_ids": [instance_id]},
                                    idempotent=True)
        except ApiError as exc:
            if exc.status != 404:
                raise
