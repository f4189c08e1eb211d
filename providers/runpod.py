"""The ``runpod`` provider: RunPod pods through the GraphQL API (reference/provider-apis.md 2.1).

GraphQL, not REST v1: v1 is deprecated and retired on 2026-11-15 (2.2), and REST v2 has no spot pods (2.3).
Everything is one ``POST {base}/graphql`` with ``{"query", "variables"}``; values go in ``variables`` as runpodctl
sends them (``api/pod.go``), never inlined into the query text, so no name or key needs GraphQL quoting.
Business errors arrive as ``{"errors": [{"message"}]}`` inside an HTTP 200; HTTP statuses (401 for a bad key,
429, 5xx) go through :class:`~._http.ApiClient` like every other marketplace.

Secure and community cloud are two products, with their own prices, stock and network (2.1): an offer is a GPU
type on one cloud, priced by ``lowestPrice(input: {secureCloud})`` for that cloud, its id ``TYPE@secure`` or
``TYPE@community``, and its pod is created with exactly that ``cloudType`` (never ``ALL``, which lets RunPod place
the pod on either cloud at either price: issue 13, SkyPilot #4914). Community cloud gives direct SSH only with
``supportPublicIp: true``, which every create sends.

Ownership: pods have no labels. Each pod is named ``{tag}-{job_id}`` and carries ``BURST_OWNER``/``BURST_JOB_ID``
env vars; ``list_owned`` filters ``myself.pods`` on our side (2.1 "Orphan tagging"). The per-job SSH key goes in
as the ``PUBLIC_KEY`` env var, which RunPod's images append to root's authorized_keys (2.1 "Account SSH key").
"""

from __future__ import annotations

import asyncio
import shlex
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from ..errors import OfferGone, ProviderError
from ._boot_watchdog import boot_command
from ._http import ApiClient, RetryPolicy, default_error_text
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
from .runpod_declared import DECLARATION, DEFAULT_BASE_URL

if TYPE_CHECKING:
    from ..spec import JobSpec

__all__ = ["CLOUDS", "DEFAULT_BASE_URL", "DEFAULT_IMAGE", "RunPodProvider"]

#: A RunPod image that starts sshd and honours PUBLIC_KEY, with Python 3 for the agent.
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"

#: RunPod publishes no per-host reliability score (Vast does). ``stockStatus`` is the nearest signal: at "Low"
#: stock a create more often fails for capacity, and a spot pod is likelier to be reclaimed. These constants only
#: let ``--min-reliability`` rank RunPod against scored offers; 0.99 sits at a good Vast host's score.
RELIABILITY = {"High": 0.99, "Medium": 0.99, "Low": 0.9}
#: cloudType -> how its offers' ids end. ``secureCloud: false`` in ``lowestPrice`` as "community cloud only" is
#: beyond the reference, which shows only ``secureCloud: true`` (2.1); decided 2026-12-06, as RunPod's own console
#: and third-party scripts ask for community prices.
CLOUDS = {"SECURE": "secure", "COMMUNITY": "community"}
_CAPACITY = ("no longer any instances available", "does not have the resources")  # 2.1; llm-autoeval#3
_NOT_FOUND = ("not found", "does not exist")  # podTerminate on a gone pod: text UNCONFIRMED, decided 2026-11-23

_POD_FIELDS = """id name imageName desiredStatus costPerHr gpuCount podType env
  runtime { ports { ip isIpPublic privatePort publicPort type } } machine { podHostId }"""
_Q_GPU_TYPES = """query GpuTypes($gpuCount: Int!, $secureCloud: Boolean) { gpuTypes {
  id displayName memoryInGb secureCloud communityCloud
  lowestPrice(input: {gpuCount: $gpuCount, secureCloud: $secureCloud}) {
    minimumBidPrice uninterruptablePrice stockStatus } } }"""
_M_ON_DEMAND = ("mutation createPod($input: PodFindAndDeployOnDemandInput!) {"
                f" podFindAndDeployOnDemand(input: $input) {{ {_POD_FIELDS} }} }}")
_M_SPOT = ("mutation createSpotPod($input: PodRentInterruptableInput!) {"
           f" podRentInterruptable(input: $input) {{ {_POD_FIELDS} }} }}")
_Q_POD = f"query pod($podId: String!) {{ pod(input: {{podId: $podId}}) {{ {_POD_FIELDS} }} }}"
_Q_PODS = f"query myPods {{ myself {{ pods {{ {_POD_FIELDS} }} }} }}"
_M_TERMINATE = "mutation terminatePod($podId: String!) { podTerminate(input: {podId: $podId}) }"  # a bare scalar


class _Model(BaseModel):
    """Lenient on the way in: RunPod adds fields, and a field we do not ask for never fails a parse."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)


class _LowestPrice(_Model):
    # Read as per GPU even when asked for gpuCount N, like securePrice/communityPrice and the spot bid
    # (``bidPerGpu``) beside them (2.1 "Price"). The reference does not say so outright; decided 2026-11-23.
    minimum_bid_price: Decimal | None = None  # spot
    uninterruptable_price: Decimal | None = None  # on-demand
    stock_status: str | None = None  # "High" | "Medium" | "Low" | "None"


class _GpuType(_Model):
    id: str
    display_name: str = ""
    memory_in_gb: int | None = None
    secure_cloud: bool | None = None
    community_cloud: bool | None = None
    lowest_price: _LowestPrice | None = None


class _Port(_Model):
    ip: str | None = None
    is_ip_public: bool = False
    private_port: int | None = None
    public_port: int | None = None
    type: str | None = None


class _Runtime(_Model):
    ports: list[_Port] | None = None


class _Machine(_Model):
    pod_host_id: str | None = None


class _Pod(_Model):
    id: str
    name: str = ""
    image_name: str | None = None
    # RUNNING | EXITED | TERMINATED: REST v1's enum, UNCONFIRMED for GraphQL (2.1); decided 2026-11-23 to read the
    # same three, and to show any other value as PENDING with RunPod's word for it.
    desired_status: str | None = None
    cost_per_hr: Decimal | None = None  # the billed $/h of the whole pod: a JSON number or a string
    gpu_count: int | None = None
    pod_type: str | None = None
    env: list[str] | None = None  # ["KEY=value", ...] in GraphQL output
    runtime: _Runtime | None = None  # null until the container is up
    machine: _Machine | None = None

    def env_map(self) -> dict[str, str]:
        pairs = (item.partition("=") for item in self.env or [])
        return {key: value for key, sep, value in pairs if sep}

    def ssh_address(self) -> tuple[str, int] | None:
        """The direct way in: the public mapping of port 22 (runpodctl ``internal/sshconnect``)."""
        for port in (self.runtime.ports or []) if self.runtime else []:
            if port.private_port == 22 and port.is_ip_public and port.ip and port.public_port:
                return port.ip, port.public_port
        return None


def _start_command(watchdog: str) -> str:
    """The pod's ``dockerArgs``: its container start command ("container arguments", runpodctl ``--args``), which
    replaces the image's CMD. It starts the boot watchdog, then what RunPod's own images run as their CMD,
    ``/start.sh`` (it starts sshd and installs PUBLIC_KEY); an image without one is kept alive for startSsh.
    That dockerArgs is the CMD, split into words as docker does, and RunPod's length limit for it are UNCONFIRMED
    (2026-12-06): the line is held to Vast's 4096 characters."""
    return "bash -c " + shlex.quote(f"{watchdog} [ -x /start.sh ] && exec /start.sh; exec sleep infinity")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def _error_text(response: httpx.Response) -> str:
    """The first GraphQL error message of a non-2xx answer, else the usual fields."""
    try:
        errors = response.json().get("errors")
        return _one_line(errors[0]["message"])
    except (ValueError, AttributeError, LookupError, TypeError):
        return default_error_text(response)


class _GraphQLError(ProviderError):
    """An ``errors`` entry in a 200 answer; ``message`` is RunPod's own text."""

    def __init__(self, text: str, *, message: str) -> None:
        super().__init__(text)
        self.message = message


class RunPodProvider:
    """RunPod pods: on-demand (``podFindAndDeployOnDemand``) or spot (``podRentInterruptable`` at the minimum bid).

    Example:
        >>> provider = RunPodProvider(api_key="...")  # doctest: +SKIP
        >>> offers = await provider.offers(OfferQuery(gpu_model="RTX_4090"))  # doctest: +SKIP
    """

    name: ClassVar[str] = DECLARATION.name
    capabilities: ClassVar[frozenset[Capability]] = DECLARATION.capabilities
    teardown_seconds: ClassVar[float] = 15.0  # podTerminate is accepted at once; the pod is gone seconds later

    def __init__(self, *, api_key: str, base_url: str = DEFAULT_BASE_URL, client: httpx.AsyncClient | None = None,
                 retry: RetryPolicy | None = None, ssh_user: str | None = None, image: str = DEFAULT_IMAGE,
                 poll_seconds: float = 5.0, container_disk_gb: int = 20) -> None:
        # The key only ever travels in the Authorization header (ApiClient), never in a URL or a body.
        self._api = ApiClient(self.name, base_url=base_url, token=api_key, client=client, retry=retry,
                              error_text=_error_text)
        self.ssh_user = ssh_user  # None: root, as on every RunPod image; tests pass the fake sshd's user
        self.image = image
        self.poll_seconds = poll_seconds
        self.container_disk_gb = container_disk_gb

    async def aclose(self) -> None:
        await self._api.aclose()

    async def _graphql(self, what: str, query: str, variables: dict[str, Any], *, idempotent: bool,
                       interactive: bool = False) -> Any:
        """POST one operation; return its ``data``, or raise with the first GraphQL error's message."""
        body = await self._api.json("POST", "/graphql", json={"query": query, "variables": variables},
                                    idempotent=idempotent, interactive=interactive)
        if not isinstance(body, dict):
            raise ProviderError(f"runpod: {what}: unexpected answer {str(body)[:120]!r}")
        errors = body.get("errors")
        if errors:  # like runpod-python and runpodctl: any "errors" key fails the call, whatever "data" holds
            first = errors[0] if isinstance(errors, list) and errors else errors
            message = first.get("message") if isinstance(first, dict) else first
            raise _GraphQLError(f"runpod: {what}: {_one_line(message or errors)}", message=str(message or ""))
        data = body.get("data")
        if not isinstance(data, dict):
            raise ProviderError(f"runpod: {what}: the answer has no data: {str(body)[:120]!r}")
        return data

    # -- offers -------------------------------------------------------------------------------------------------

    async def offers(self, query: OfferQuery) -> list[Offer]:
        """Per cloud, one ``gpuTypes`` query priced for ``query.gpus``; one offer per GPU type and cloud in stock.

        RunPod rents by GPU type and places the pod on a host of the cloud asked for, so an offer is a type on a
        cloud, not a host. Prices are per GPU (``lowestPrice``), times the GPU count. GPU-less pods are a different
        API: no offers for 0 GPUs.
        """
        if query.gpus < 1:
            return []
        answers = await asyncio.gather(*(
            self._graphql("gpuTypes", _Q_GPU_TYPES, {"gpuCount": query.gpus, "secureCloud": cloud == "SECURE"},
                          idempotent=True, interactive=True) for cloud in CLOUDS))
        found = []
        for cloud, data in zip(CLOUDS, answers, strict=True):
            for raw in data.get("gpuTypes") or []:
                try:
                    gpu = _GpuType.model_validate(raw)
                except ValidationError:
                    continue  # one odd entry must not hide the others
                offer = self._offer(gpu, cloud, query)
                if offer is not None and query.fits(offer):
                    found.append(offer)
        found.sort(key=lambda o: (o.price_usd_per_hour, -o.reliability, o.offer_id))
        return found

    def _offer(self, gpu: _GpuType, cloud: str, query: OfferQuery) -> Offer | None:
        model = DECLARATION.gpus.identify(gpu.id, memory_gb=gpu.memory_in_gb)
        low = gpu.lowest_price
        stock = low.stock_status if low is not None else None
        if model is None or low is None or stock is None or stock == "None":
            return None
        if (gpu.secure_cloud if cloud == "SECURE" else gpu.community_cloud) is False:
            return None
        per_gpu = low.minimum_bid_price if query.spot else low.uninterruptable_price
        if per_gpu is None or per_gpu <= 0:
            return None
        tier = CLOUDS[cloud]
        return Offer(provider=self.name, offer_id=f"{gpu.id}@{tier}", gpu_model=model, gpus=query.gpus,
                     price_usd_per_hour=per_gpu * query.gpus, memory_gb=gpu.memory_in_gb,
                     reliability=RELIABILITY.get(stock, 0.9), spot=query.spot, tier=tier,
                     description=f"{gpu.display_name or gpu.id}, {tier} cloud{', spot' if query.spot else ''}, "
                                 f"stock {stock.lower()}",
                     extra={"bid_per_gpu": str(per_gpu) if query.spot else None})

    # -- launch -------------------------------------------------------------------------------------------------

    async def launch(self, offer: Offer, spec: JobSpec, *, job_id: str, tag: str,
                     ssh_public_key: str | None, watch: BootWatch | None = None) -> Instance:
        """Create the pod; return it PENDING. RunPod places it on any host with that GPU type in stock. ``watch``
        arms the boot watchdog in the pod's start command.

        The create is never retried after it may have reached RunPod (``idempotent=False``): a lost reply leaves
        a pod named ``{tag}-{job_id}`` that ``list_owned`` finds. The capacity error raises OfferGone.
        """
        gpu_type, _, tier = offer.offer_id.rpartition("@")
        cloud = next((name for name, shown in CLOUDS.items() if shown == tier), None)
        if not gpu_type or cloud is None:
            raise ProviderError(f"runpod: offer {offer.offer_id!r} names no cloud (TYPE@secure or TYPE@community)")
        env = [{"key": "BURST_OWNER", "value": tag}, {"key": "BURST_JOB_ID", "value": job_id}]
        if ssh_public_key:
            env.insert(0, {"key": "PUBLIC_KEY", "value": ssh_public_key.strip()})
        pod_input: dict[str, Any] = {
            "name": f"{tag}-{job_id}", "imageName": spec.image or self.image, "gpuTypeId": gpu_type,
            "gpuCount": offer.gpus, "cloudType": cloud,  # an enum: the JSON string is its name
            "containerDiskInGb": self.container_disk_gb, "volumeInGb": 0,
            "ports": "22/tcp",  # one comma-joined string; a public 22 is what direct SSH needs
            "supportPublicIp": True,  # community cloud: a public IP for that 22 (2.1); secure cloud has one anyway
            "startSsh": True, "env": env,
        }
        if watch is not None:
            pod_input["dockerArgs"] = _start_command(boot_command(
                self.self_destruct(), watch, workdir=f"{REMOTE_JOB_ROOT}/{job_id}", poll_seconds=self.poll_seconds))
        if offer.spot:
            bid = offer.extra.get("bid_per_gpu") or offer.price_per_gpu_hour
            pod_input["bidPerGpu"] = float(Decimal(str(bid)))  # GraphQL Float on the wire only; no arithmetic
        op = "podRentInterruptable" if offer.spot else "podFindAndDeployOnDemand"
        try:
            data = await self._graphql(op, _M_SPOT if offer.spot else _M_ON_DEMAND, {"input": pod_input},
                                       idempotent=False)
        except _GraphQLError as exc:
            if any(text in exc.message.lower() for text in _CAPACITY):
                raise OfferGone(f"runpod: no {offer.gpu_model or gpu_type} x{offer.gpus} left on {tier} cloud "
                                f"(taken since the search): {_one_line(exc.message)}") from None
            raise
        except ProviderError as exc:
            return await find_created(self, tag=tag, job_id=job_id, lost=exc)  # the pod named {tag}-{job_id}
        try:
            pod = _Pod.model_validate(data.get(op))
        except ValidationError as exc:
            raise ProviderError(f"runpod: {op}: unexpected answer: {str(data)[:200]!r}") from exc
        return Instance(provider=self.name, instance_id=pod.id, state=InstanceState.PENDING, endpoint=None,
                        workdir=f"{REMOTE_JOB_ROOT}/{job_id}",
                        price_usd_per_hour=pod.cost_per_hr or offer.price_usd_per_hour, tag=tag,
                        gpu_model=offer.gpu_model, job_id=job_id, detail="created", spot=offer.spot)

    # -- look up ------------------------------------------------------------------------------------------------

    async def get(self, instance_id: str) -> Instance | None:
        """The pod now; None once RunPod has no pod by that id or it is TERMINATED."""
        data = await self._graphql("pod", _Q_POD, {"podId": instance_id}, idempotent=True)
        if data.get("pod") is None:
            return None
        pod = self._parse(data["pod"])
        return None if pod.desired_status == "TERMINATED" else self._instance(pod)

    async def list_owned(self, tag: str) -> list[Instance]:
        """Every pod of the account carrying ``tag`` (its BURST_OWNER env, else its name prefix), not terminated."""
        data = await self._graphql("myself.pods", _Q_PODS, {}, idempotent=True)
        owned = []
        for raw in (data.get("myself") or {}).get("pods") or []:
            pod = self._parse(raw)
            owner = pod.env_map().get("BURST_OWNER")
            # The env var decides when present: the prefix "a-" also starts the names of tag "a-b"'s pods.
            mine = owner == tag if owner is not None else pod.name.startswith(f"{tag}-")
            if mine and pod.desired_status != "TERMINATED":
                owned.append(self._instance(pod, tag=tag))
        return owned

    @staticmethod
    def _parse(raw: Any) -> _Pod:
        try:
            return _Pod.model_validate(raw)
        except ValidationError as exc:
            raise ProviderError(f"runpod: unexpected pod record: {str(raw)[:200]!r}") from exc

    def _instance(self, pod: _Pod, *, tag: str | None = None) -> Instance:
        env = pod.env_map()
        owner = env.get("BURST_OWNER") or tag or ""
        job_id = env.get("BURST_JOB_ID") or (pod.name.removeprefix(f"{owner}-") if owner else None)
        # podType of a spot pod: "INTERRUPTABLE" is UNCONFIRMED (2.1); decided 2026-11-23 to trust that spelling.
        spot = (pod.pod_type or "").upper() in ("INTERRUPTABLE", "INTERRUPTIBLE")
        status = pod.desired_status or "unknown"
        ssh = pod.ssh_address()
        endpoint = None
        if status == "RUNNING" and ssh is not None:
            state, detail = InstanceState.RUNNING, "running"
            endpoint = Endpoint(host=ssh[0], port=ssh[1], user=self.ssh_user or "root")
        elif status == "RUNNING":
            state = InstanceState.PENDING
            detail = "starting the container" if pod.runtime is None else "waiting for a public SSH port"
        elif status == "EXITED":
            state = InstanceState.STOPPED
            detail = "interrupted: the spot pod was reclaimed or outbid" if spot else "exited"
        else:
            state, detail = InstanceState.PENDING, status.lower()
        return Instance(provider=self.name, instance_id=pod.id, state=state, endpoint=endpoint,
                        workdir=f"{REMOTE_JOB_ROOT}/{job_id or pod.id}",
                        price_usd_per_hour=pod.cost_per_hr or Decimal(0), tag=owner, job_id=job_id,
                        detail=detail, spot=spot)

    def self_destruct(self) -> SelfDestruct:
        """The agent's way to end its own pod: ``podTerminate`` with the pod's own ``RUNPOD_POD_ID`` and
        ``RUNPOD_API_KEY``. RunPod's docs call the key every pod gets "Pod-scoped" (runpodctl page); that it can
        terminate its own pod and nothing else is UNCONFIRMED live (2026-11-29). The account key never goes in.
        """
        return SelfDestruct(provider=self.name, method="POST", url=self._api.url("/graphql"),
                            id_env="RUNPOD_POD_ID", key_env="RUNPOD_API_KEY",
                            body={"query": _M_TERMINATE, "variables": {"podId": "{id}"}})

    # -- terminate ----------------------------------------------------------------------------------------------

    async def terminate(self, instance_id: str) -> None:
        """Ask RunPod to terminate the pod; a pod it no longer knows is already gone. Callers confirm with ``get``.

        Terminating twice does nothing more, so the request is retried after a 5xx or a lost answer.
        """
        try:
            await self._graphql("podTerminate", _M_TERMINATE, {"podId": instance_id}, idempotent=True)
        except _GraphQLError as exc:
            if not any(text in exc.message.lower() for text in _NOT_FOUND):
                raise
