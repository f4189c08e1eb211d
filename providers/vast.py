"""The ``vast`` provider: Vast.ai's marketplace through its REST API (reference/provider-apis.md, section 1).

One rented instance per job. The owner tag goes in the instance ``label`` (filterable server-side, 1.7), the job
id in its environment (``BURST_JOB_ID``, read back from ``extra_env``), and the job's public key is attached to
that one instance only (1.8), so neither the user's account keys nor the API key ever reach the machine: the key
travels in the ``Authorization`` header and nowhere else.

Vast facts this module relies on beyond the reference are marked "(2026-11-23)" where they are used.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from ..errors import ApiError, OfferGone, ProviderError, ProvisioningFailed, one_line
from ._boot_watchdog import boot_command
from ._http import ApiClient, RetryPolicy, money_from_json
from .base import (
    REMOTE_JOB_ROOT,
    BootWatch,
    Capability,
    Endpoint,
    Instance,
    InstanceState,
    Offer,
    OfferQuery,
    SelfDestruct,
    find_created,
)
from .vast_declared import DECLARATION, DEFAULT_URL

if TYPE_CHECKING:
    from ..spec import JobSpec

__all__ = ["DEFAULT_IMAGE", "VastProvider"]

#: Any image works for SSH (Vast's ssh runtype injects its own sshd); the agent needs python3, which this has.
DEFAULT_IMAGE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
SEARCH_LIMIT = 64  # offers asked for per search (the reference's example); fits() may drop a few
PAGE_LIMIT = 25  # the v1 instance list serves at most 25 rows a page (1.5)
MAX_PAGES = 400  # 10,000 instances: a guard against a server that keeps handing out tokens
#: The CLI/SDK default search filters (1.3): verified hosts, offers that can be rented now.
DEFAULT_FILTERS: dict[str, Any] = {"verified": {"eq": True}, "external": {"eq": False},
                                   "rentable": {"eq": True}, "rented": {"eq": False}}
_BOOTING = (None, "", "created", "loading", "scheduling")


def _get_params(values: Mapping[str, Any]) -> dict[str, str]:
    """Vast's GET convention (1.1): each value JSON-dumped, except plain strings; httpx url-encodes them."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def _memory_gb(row: Mapping[str, Any]) -> float | None:
    mb = row.get("gpu_ram")
    return float(mb) / 1000 if isinstance(mb, (int, float)) and mb > 0 else None  # MB in the API (1.3)


def _env(row: Mapping[str, Any]) -> dict[str, str]:
    """``extra_env`` is a list of [k, v] pairs (1.5); the SDK hands a dict, so take either."""
    raw = row.get("extra_env") or []
    pairs = raw.items() if isinstance(raw, Mapping) else (p for p in raw if isinstance(p, (list, tuple)))
    return {str(p[0]): str(p[1]) for p in pairs if len(p) == 2}


class VastProvider:
    """Vast.ai: search offers, rent one by ask id, reach it over SSH as root, destroy it.

    ``ssh_user`` overrides Vast's ``root`` (the tests' fake machines log in as the test user).
    """

    name: ClassVar[str] = DECLARATION.name
    capabilities: ClassVar[frozenset[Capability]] = DECLARATION.capabilities
    teardown_seconds: ClassVar[float] = 5.0  # a destroy is accepted at once; the show call confirms it soon after

    def __init__(self, *, api_key: str, base_url: str = DEFAULT_URL,
                 client: httpx.AsyncClient | None = None, retry: RetryPolicy | None = None,
                 ssh_user: str | None = None, image: str = DEFAULT_IMAGE, poll_seconds: float = 10.0,
                 disk_gb: int = 20) -> None:
        self._api = ApiClient(self.name, base_url=base_url, token=api_key, client=client, retry=retry,
                              timeout=120.0)  # the SDK's request timeout (1.2)
        self.ssh_user = ssh_user
        self.image = image
        self.poll_seconds = poll_seconds  # "poll every 10 s or more" (1.5)
        self.disk_gb = max(disk_gb, 8)  # the create call refuses less than 8 GB (1.4)

    async def aclose(self) -> None:
        await self._api.aclose()

    # -- offers ----------------------------------------------------------------------------------------------

    def _search_body(self, query: OfferQuery) -> dict[str, Any]:
        """The flat filter body of ``POST /api/v0/bundles/`` (1.3). Units: gpu_ram in MB, reliability 0..1.

        ``num_gpus`` is ``eq``: a job asking for N GPUs rents exactly N, so the result limit is not spent on
        bigger machines that cost more (``fits()`` would accept them; the cheapest rarely is one).
        """
        body: dict[str, Any] = {
            **DEFAULT_FILTERS,
            "gpu_name": {"in": list(DECLARATION.gpus.of(query.gpu_model))},  # spaces: "RTX 4090" (1.3 gotcha)
            "num_gpus": {"eq": max(query.gpus, 1)},
            "order": [["dph_total", "asc"]],
            "type": "bid" if query.spot else "on-demand",
            "limit": SEARCH_LIMIT,
            "allocated_storage": float(self.disk_gb),  # folds the disk we will ask for into dph_total (1.3)
        }
        floor = query.memory_floor(query.gpu_model)  # ANY: each model's own floor, checked by fits()
        if floor:
            body["gpu_ram"] = {"gte": round(floor * 1000)}  # MB
        if query.min_reliability is not None:
            body["reliability"] = {"gte": query.min_reliability}
        if query.direct_ssh:
            body["direct_port_count"] = {"gte": 1}
        # A spot offer's price is its min_bid, not dph_total (1.9), so the ceiling is applied on our side then.
        if query.max_price_usd_per_hour is not None and not query.spot:
            body["dph_total"] = {"lte": float(query.max_price_usd_per_hour)}
        return body

    async def offers(self, query: OfferQuery) -> list[Offer]:
        """Live offers that fit ``query``, cheapest first. Offers of GPUs the catalog does not know are dropped."""
        if not DECLARATION.gpus.of(query.gpu_model):
            return []  # a model Vast does not sell
        # A search changes nothing, so retrying it after a 5xx is safe although it is a POST.
        reply = await self._api.json("POST", "/api/v0/bundles/", json=self._search_body(query), idempotent=True,
                                    interactive=True)
        rows = reply.get("offers") if isinstance(reply, Mapping) else None
        found = [offer for row in rows or [] if (offer := self._offer(row, spot=query.spot)) is not None]
        return sorted((o for o in found if query.fits(o)), key=lambda o: o.price_usd_per_hour)

    def _offer(self, row: Mapping[str, Any], *, spot: bool) -> Offer | None:
        if row.get("rented") is True or row.get("id") is None:
            return None  # the CLI re-checks rented on its side too (1.3)
        memory = _memory_gb(row)
        model = DECLARATION.gpus.identify(str(row.get("gpu_name") or ""), memory_gb=memory)
        # Spot: the bid floor for the whole machine (1.9). Whether min_bid includes the storage folded into
        # dph_total is not documented (2026-11-23); get() reads the billed dph_total once it runs.
        price = money_from_json(row.get("min_bid") if spot else row.get("dph_total"))
        if model is None or price is None:
            return None
        gpus = int(row.get("num_gpus") or 1)
        reliability = float(row.get("reliability") or row.get("reliability2") or 0.0)
        location = str(row.get("geolocation") or "")
        mem = f" {int(memory)} GB" if memory else ""
        return Offer(
            provider=self.name, offer_id=str(row["id"]), gpu_model=model, gpus=gpus, price_usd_per_hour=price,
            memory_gb=int(memory) if memory else None, reliability=reliability, spot=spot, location=location,
            description=f"{gpus}x {row.get('gpu_name')}{mem}, {location or 'somewhere'}, "
                        f"reliability {reliability:.3f}, machine {row.get('machine_id')}",
            extra={"machine_id": row.get("machine_id"), "direct": int(row.get("direct_port_count") or 0) > 0,
                   "dph_total": str(row.get("dph_total")), "min_bid": str(row.get("min_bid")),
                   "cuda_max_good": row.get("cuda_max_good")},
        )

    # -- launch ----------------------------------------------------------------------------------------------

    async def launch(self, offer: Offer, spec: JobSpec, *, job_id: str, tag: str,
                     ssh_public_key: str | None, watch: BootWatch | None = None) -> Instance:
        """Rent ``offer`` (its ask id), label it ``tag`` and attach ``ssh_public_key`` to it alone; ``watch`` arms
        the boot watchdog in ``onstart``.

        Raises OfferGone when the ask was taken meanwhile (404/410). A create whose reply was lost is found
        again by tag and job id. If the key cannot be attached the new instance is destroyed before raising.
        """
        body: dict[str, Any] = {
            "client_id": "me",
            "image": spec.image or self.image,
            "disk": self.disk_gb,
            "label": tag,
            "env": {"-p 22:22": "1", "BURST_OWNER": tag, "BURST_JOB_ID": job_id},
            # The CLI sends the truncated "ssh_direc ssh_proxy" for --ssh --direct, and rows echo it in
            # image_runtype (1.4 gotcha): direct port 22 when the host has ports, Vast's proxy otherwise. Only a
            # *_direct runtype maps port 22 on the host, so an offer without direct ports gets the proxy only.
            "runtype": "ssh_direc ssh_proxy" if offer.extra.get("direct", True) else "ssh_proxy",
            "cancel_unavail": True,  # a taken ask answers 410 at once instead of queueing (1.4)
        }
        workdir = f"{REMOTE_JOB_ROOT}/{job_id}"
        if watch is not None:
            # onstart is a shell script Vast runs when the container starts, under the container's environment
            # (CONTAINER_ID, CONTAINER_API_KEY); with an ssh runtype it replaces the image's entrypoint (Vast's
            # "Docker execution environment" guide, read 2026-12-06). At most 4096 characters (1.4).
            body["onstart"] = boot_command(self.self_destruct(), watch, workdir=workdir,
                                           poll_seconds=self.poll_seconds)
        if offer.spot:
            body["price"] = float(offer.price_usd_per_hour)  # the bid, $/h for the whole machine (1.4, 1.9)
        instance_id = await self._create(offer, body, job_id=job_id, tag=tag)
        if ssh_public_key:
            await self._attach_key(instance_id, ssh_public_key, tag=tag)
        return Instance(provider=self.name, instance_id=instance_id, state=InstanceState.PENDING, endpoint=None,
                        workdir=workdir, price_usd_per_hour=offer.price_usd_per_hour,
                        tag=tag, gpu_model=offer.gpu_model, job_id=job_id, detail="created", spot=offer.spot)

    async def _create(self, offer: Offer, body: dict[str, Any], *, job_id: str, tag: str) -> str:
        try:
            # Never retried blindly after it may have been carried out: a second try would rent a second box.
            reply = await self._api.json("PUT", f"/api/v0/asks/{offer.offer_id}/", json=body, idempotent=False)
        except ProviderError as exc:
            if isinstance(exc, ApiError) and exc.status in (404, 410):  # no_such_ask: taken since the search (1.4)
                raise OfferGone(f"vast: offer {offer.offer_id} ({offer.description}) was taken before it could "
                                "be rented; search again") from exc
            return (await find_created(self, tag=tag, job_id=job_id, lost=exc)).instance_id
        contract = reply.get("new_contract") if isinstance(reply, Mapping) else None
        if contract is None:
            raise ProviderError(f"vast: the create call answered without an instance id: {str(reply)[:200]}")
        return str(contract)  # new_contract is the instance id (1.4)

    async def _attach_key(self, instance_id: str, public_key: str, *, tag: str) -> None:
        try:
            # Attaching the same key twice is harmless, so this one may be retried.
            await self._api.json("POST", f"/api/v0/instances/{instance_id}/ssh/",
                                 json={"ssh_key": public_key.strip()}, idempotent=True)
        except BaseException as exc:
            left = ""
            try:
                await self.terminate(instance_id)
            except ProviderError as gone:
                left = (f"; destroying it failed too ({one_line(gone, about=self.name)}): it is labelled {tag}, and "
                        "`burst cleanup` ends it")
            if isinstance(exc, ProviderError):
                raise ProvisioningFailed(f"vast: could not attach the SSH key to instance {instance_id} "
                                         f"({one_line(exc, about=self.name)})"
                                         + (left or "; it was destroyed")) from exc
            raise

    # -- look-ups ----------------------------------------------------------------------------------------------

    async def get(self, instance_id: str) -> Instance | None:
        """The instance as Vast shows it now, or None once it is gone (``"instances": null`` or 404)."""
        response = await self._api.request("GET", f"/api/v0/instances/{instance_id}/",
                                           params=_get_params({"owner": "me"}), ok=lambda r: r.status_code == 404)
        if response.status_code == 404:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        # Only an explicit "instances": null means gone: anything else unexpected must not confirm a destroy.
        if not isinstance(body, Mapping) or "instances" not in body:
            raise ProviderError(f"vast: instance {instance_id}: unexpected answer {response.text[:120]!r}")
        row = body["instances"]
        if isinstance(row, list):  # the legacy list shape; take ours
            row = next((r for r in row if str(r.get("id")) == str(instance_id)), None)
        return self._instance(row) if isinstance(row, Mapping) else None

    async def list_owned(self, tag: str) -> list[Instance]:
        """Every instance labelled ``tag``, from the v1 list, following ``next_token`` to the last page (1.5)."""
        found: list[Instance] = []
        token: str | None = None
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {"select_filters": {"label": {"eq": tag}},
                                      "order_by": [{"col": "id", "dir": "asc"}], "limit": PAGE_LIMIT}
            if token:
                params["after_token"] = token
            reply = await self._api.json("GET", "/api/v1/instances/", params=_get_params(params))
            rows = reply.get("instances") if isinstance(reply, Mapping) else None
            found += [self._instance(r) for r in rows or [] if isinstance(r, Mapping) and r.get("label") == tag]
            token = reply.get("next_token") if isinstance(reply, Mapping) else None
            if not token:
                return found
        raise ProviderError(f"vast: the instance list for {tag} did not end after {MAX_PAGES} pages")

    async def terminate(self, instance_id: str) -> None:
        """Destroy; an unknown or already destroyed id (404 not_found, 1.7) returns quietly. Does not wait."""
        await self._api.request("DELETE", f"/api/v0/instances/{instance_id}/", json={},
                                ok=lambda r: r.status_code == 404)

    def self_destruct(self) -> SelfDestruct:
        """The agent's way to destroy its own instance: ``DELETE /api/v0/instances/{id}/`` (1.7) with the key Vast
        injects into every instance. Vast puts ``CONTAINER_ID`` and ``CONTAINER_API_KEY`` (a key that can only stop
        or destroy that one instance) in the container's environment, PID 1's, which SSH sessions do not inherit
        (seen in public code, 2026-11-29); the agent looks there too. The account key never reaches the machine.
        """
        return SelfDestruct(provider=self.name, method="DELETE", url=self._api.url("/api/v0/instances/{id}/"),
                            id_env="CONTAINER_ID", key_env="CONTAINER_API_KEY", body={})

    # -- mapping -----------------------------------------------------------------------------------------------

    def _endpoint(self, row: Mapping[str, Any]) -> Endpoint | None:
        """Direct port 22 when mapped, else Vast's SSH proxy (1.6)."""
        user = self.ssh_user or "root"
        ports = row.get("ports") or {}
        direct = ports.get("22/tcp") if isinstance(ports, Mapping) else None
        ip = str(row.get("public_ipaddr") or "").strip()  # stray whitespace would break the ssh host
        if direct and ip:
            with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):
                return Endpoint(host=ip, port=int(direct[0]["HostPort"]), user=user)  # HostPort is a string
        host, port = row.get("ssh_host"), row.get("ssh_port")
        if host and port:
            # The CLI adds 1 to the proxy port of a jupyter runtype (1.6); ours is ssh, kept for such rows.
            bump = 1 if "jupyter" in str(row.get("image_runtype") or "") else 0
            return Endpoint(host=str(host).strip(), port=int(port) + bump, user=user)
        return None

    def _state(self, row: Mapping[str, Any], endpoint: Endpoint | None) -> tuple[InstanceState, str]:
        actual, msg = row.get("actual_status"), str(row.get("status_msg") or "").strip()
        bid = bool(row.get("is_bid"))
        # A stopped instance has intended_status "stopped" (1.5); cur_state "stopped" is what a pause shows
        # while Vast still intends to resume it, as an outbid bid does (1.9; read as such 2026-11-23).
        if row.get("intended_status") == "stopped" or row.get("cur_state") == "stopped":
            return InstanceState.STOPPED, "outbid/paused" if bid else (msg or "stopped")
        if actual == "running":
            if endpoint is None:
                return InstanceState.PENDING, "running, waiting for the SSH port"
            return InstanceState.RUNNING, msg
        if actual in _BOOTING:
            return InstanceState.PENDING, msg or str(actual or "provisioning")
        if bid and actual in ("exited", "stopped"):
            return InstanceState.STOPPED, "outbid/paused"  # a bid that lost its machine pauses (1.9)
        # exited (failed to start), offline, unknown (no heartbeat): Vast will not bring it up by itself.
        return InstanceState.FAILED, msg or str(actual)

    def _instance(self, row: Mapping[str, Any]) -> Instance:
        endpoint = self._endpoint(row) if row.get("actual_status") == "running" else None
        state, detail = self._state(row, endpoint)
        job_id = _env(row).get("BURST_JOB_ID")
        started = row.get("start_date")
        created = (dt.datetime.fromtimestamp(float(started), dt.timezone.utc)
                   if isinstance(started, (int, float)) and started > 0 else None)
        return Instance(
            provider=self.name, instance_id=str(row.get("id")), state=state,
            endpoint=endpoint if state is InstanceState.RUNNING else None,
            workdir=f"{REMOTE_JOB_ROOT}/{job_id}" if job_id else REMOTE_JOB_ROOT,
            price_usd_per_hour=money_from_json(row.get("dph_total")) or Decimal(0),  # the rate actually billed (1.9)
            tag=str(row.get("label") or ""), job_id=job_id, detail=detail, spot=bool(row.get("is_bid")),
            gpu_model=DECLARATION.gpus.identify(str(row.get("gpu_name") or ""), memory_gb=_memory_gb(row)),
            created_at=created or dt.datetime.now(dt.timezone.utc),
        )
