"""A stateful fake of Thunder Compute's REST API (reference/provider-apis.md, section 3 and the checklist in 6).

What it keeps faithful:

- Public catalog endpoints (no token): ``GET /v1/pricing`` (keys ``{gpu}_x{count}_{mode}`` plus
  ``additional_vcpus``, ``disk_gb``, ``ephemeral_disk_gb``), ``GET /v1/specs`` and ``GET /v1/status``.
- ``GET /v1/instances/list`` is a MAP keyed by a small index string, and the indexes are renumbered 0..n-1 on
  every delete: a client that keeps an index instead of the uuid deletes the wrong machine here.
- ``POST /v1/instances/create`` answers ``{uuid, key, identifier}``; the ``public_key`` is authorized on the
  machine (a real sshd) and shown, comment included, in ``sshPublicKeys``. ``key`` is always a placeholder
  private key, so tests can prove the client drops it (whether Thunder sends one along with a given public key
  is UNCONFIRMED).
- ``POST /v1/instances/{index}/delete`` with no body; statuses in upper case, ``PROVISIONING`` -> ``STARTING`` ->
  ``RUNNING`` with ``ip``/``port`` only once the machine's sshd answers (``ip`` null before); ``cpuCores``,
  ``numGpus`` and ``memory`` as strings.
- Errors as ``{"error", "message", "code"}``: 401 ``unauthorized``, 404 ``not_found``, 400 ``invalid_request``.
- Modes are products of their own: every spec key names one (``a100xl_x1_prototyping``, ``a100xl_x1_production``)
  with its own price row and its own availability, and a create in one mode never takes the other's capacity.

Chosen where the reference is silent (2026-11-23): a capacity refusal is HTTP 409
``{"error":"no_capacity","message":"No capacity available for <spec key>","code":409}``; a 429 uses the same
error shape (``rate_limited``) and sends ``Retry-After`` only when ``switches.retry_after`` is set; an instance
that never boots (``switches.boot_fails``) goes ``PROVISIONING`` -> ``UNKNOWN`` after the boot delay; a delete
removes the instance from the list at once.
"""

from __future__ import annotations

import copy
import datetime as dt
import time
import uuid as uuidlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from .base import DropReply, FakeCloud, FakeMachine, billed, json_response

__all__ = ["PRICING", "SPECS", "FakeThunder"]

#: $/h, shaped like the real table; h100_x1_production and a100xl_x1_prototyping near Thunder's list prices.
PRICING: dict[str, float] = {
    "a6000_x1_prototyping": 0.27,
    "a100xl_x1_prototyping": 0.78, "a100xl_x2_prototyping": 1.56,
    "h100_x1_prototyping": 1.38, "h100_x2_prototyping": 2.76,
    "a100xl_x1_production": 1.29, "a100xl_x2_production": 2.58, "a100xl_x4_production": 5.16,
    "a100xl_x8_production": 10.32,
    "h100_x1_production": 1.89, "h100_x2_production": 3.78, "h100_x4_production": 7.56, "h100_x8_production": 15.12,
    "additional_vcpus": 0.02, "disk_gb": 0.0001, "ephemeral_disk_gb": 0.00005,
}

_NAMES = {"a6000": ("NVIDIA RTX A6000", 48), "a100xl": ("NVIDIA A100 (80GB)", 80), "h100": ("NVIDIA H100", 80)}


def _spec(gpu: str, count: int, mode: str) -> dict[str, Any]:
    name, vram = _NAMES[gpu]
    # Production has one fixed vCPU count (thunder-cli create.go takes the first option); prototyping a choice.
    vcpus = [4 * count, 4 * count + 4, 4 * count + 8] if mode == "prototyping" else [18 * count]
    return {"displayName": name, "vramGB": vram, "gpuCount": count, "mode": mode, "vcpuOptions": vcpus,
            "ramPerVCPUGiB": 8 if mode == "prototyping" else 5,
            "storageGB": {"min": 100, "max": 500 * count}, "ephemeralStorageGB": {"min": 0, "max": 2000}}


SPECS: dict[str, dict[str, Any]] = {}
for _key in PRICING:
    _gpu, _, _rest = _key.partition("_x")
    if _rest:
        _count, _, _mode = _rest.partition("_")
        SPECS[_key] = _spec(_gpu, int(_count), _mode)

_ALIASES = {"a100": "a100xl"}


def _error(status: int, error: str, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return json_response(status, {"error": error, "message": message, "code": status}, headers)


class FakeThunder(FakeCloud):
    """Thunder's API with real sshd machines behind it. Tests change ``pricing``/``specs``/``availability`` to
    shape the catalog, set ``ip_lag`` to have new instances show RUNNING with a null ip for that many lists,
    and read ``running()``, ``instance(uuid)``, ``machine(uuid)`` and ``index_of(uuid)``."""

    name = "thunder"

    def __init__(self, root: Path, *, api_key: str = "test-key") -> None:
        super().__init__(root, api_key=api_key)
        self.pricing: dict[str, float] = dict(PRICING)
        self.specs: dict[str, dict[str, Any]] = copy.deepcopy(SPECS)
        self.availability: dict[str, str] = {key: "available" for key in self.specs}
        self.availability["h100_x8_production"] = "unavailable"
        self.ip_lag = 0
        #: mode -> the next N creates in that mode find their spec just taken: 409, and the spec stays unavailable
        #: in ``/v1/status`` (capacity that moved between search and create).
        self.sold_out_on_create: dict[str, int] = {}
        self.instances: dict[str, dict[str, Any]] = {}  # uuid -> record, in creation order (= index order)
        self.deleted: dict[str, dict[str, Any]] = {}
        self._machines: dict[str, FakeMachine] = {}
        self._boot: dict[str, tuple[float, int]] = {}  # uuid -> (boot delay, lists left showing RUNNING, no ip)
        self._booting: set[str] = set()
        self._identifier = 0
        self._bill: dict[str, tuple[Decimal, float, float | None]] = {}  # uuid -> ($/h, created, deleted)

    # -- inspection ------------------------------------------------------------------------------------------

    def running(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(self._refresh(u)) for u in self.instances]

    def instance(self, uuid: str) -> dict[str, Any] | None:
        """The live record itself (tests may edit it, e.g. ``port = 0``), or None once deleted."""
        with self.lock:
            return self._refresh(uuid) if uuid in self.instances else None

    def bills(self) -> dict[str, Decimal]:
        """Each instance at the list price it was created at, created to deleted."""
        with self.lock:
            return {uuid: billed(*bill) for uuid, bill in self._bill.items()}

    def machine(self, uuid: str) -> FakeMachine:
        return self._machines[uuid]

    def index_of(self, uuid: str) -> str | None:
        with self.lock:
            return str(list(self.instances).index(uuid)) if uuid in self.instances else None

    # -- serving ---------------------------------------------------------------------------------------------

    def too_many(self) -> httpx.Response:
        after = self.switches.retry_after
        return _error(429, "rate_limited", "Too many requests",
                      {"retry-after": f"{after:g}"} if after is not None else None)

    def dispatch(self, request: httpx.Request, body: Any) -> httpx.Response:
        path = request.url.path.rstrip("/")
        method = request.method
        if not path.startswith("/v1/"):
            return _error(404, "not_found", "Not found")
        path = path[3:]
        if method == "GET" and path == "/pricing":
            return json_response(200, {"pricing": self.pricing})
        if method == "GET" and path == "/specs":
            return json_response(200, {"specs": self.specs})
        if method == "GET" and path == "/status":
            by_gpu: dict[str, dict[str, str]] = {}
            for key, state in self.availability.items():
                gpu, _, rest = key.partition("_x")
                mode = rest.partition("_")[2]
                slot = by_gpu.setdefault(gpu, {})
                slot[mode] = "available" if state == "available" or slot.get(mode) == "available" else state
            return json_response(200, {"gpu_type": by_gpu, "specs": self.availability})
        if not self.authorized(request):
            return _error(401, "unauthorized", "Authentication required")
        if method == "GET" and path == "/auth/validate":
            return json_response(200, {"valid": True, "email": "test@example.com", "org_name": "test"})
        if method == "GET" and path == "/instances/list":
            listed = {str(i): self._refresh(u, listing=True) for i, u in enumerate(list(self.instances))}
            return json_response(200, listed)
        if method == "POST" and path == "/instances/create":
            return self._create(body if isinstance(body, dict) else {})
        parts = path.split("/")
        if method == "POST" and len(parts) == 4 and parts[1] == "instances" and parts[3] == "delete":
            return self._delete(parts[2])
        return _error(404, "not_found", "Not found")

    def _create(self, body: dict[str, Any]) -> httpx.Response:
        gpu = str(body.get("gpu_type") or "").lower()
        gpu = _ALIASES.get(gpu, gpu)
        key = f"{gpu}_x{body.get('num_gpus')}_{body.get('mode')}"
        spec = self.specs.get(key)
        if spec is None:
            return _error(400, "invalid_request", f"Invalid GPU configuration: {key}")
        if body.get("cpu_cores") not in spec["vcpuOptions"]:
            return _error(400, "invalid_request", f"cpu_cores must be one of {spec['vcpuOptions']}")
        disk = body.get("disk_size_gb", 100)
        if not isinstance(disk, int) or not spec["storageGB"]["min"] <= disk <= spec["storageGB"]["max"]:
            return _error(400, "invalid_request", "disk_size_gb is out of range")
        mode = str(body.get("mode"))
        if self.sold_out_on_create.get(mode, 0) > 0:
            self.sold_out_on_create[mode] -= 1
            self.availability[key] = "unavailable"
        if (self.switches.take("capacity_errors") or self.switches.take("take_offer_on_create")
                or self.availability.get(key) != "available"):
            return _error(409, "no_capacity", f"No capacity available for {key}")
        fail = self.switches.take("boot_fails")
        machine = self.machines.create(boot_delay=self.switches.boot_delay, fail=fail, gpu=("thunder", gpu),
                                       count=int(body.get("num_gpus") or 1))
        public_key = str(body.get("public_key") or "").strip()
        if public_key:
            machine.authorize(public_key)
        uuid = str(uuidlib.uuid4())
        identifier = len(self.instances)
        self._identifier += 1
        vcpus = int(body["cpu_cores"])
        self.instances[uuid] = {
            "uuid": uuid, "name": f"instance-{self._identifier}", "status": "PROVISIONING", "ip": None, "port": 0,
            "createdAt": dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z"),
            "storage": disk, "ephemeralDiskGB": int(body.get("ephemeral_disk_gb") or 0),
            "cpuCores": str(vcpus), "gpuType": gpu, "numGpus": str(body["num_gpus"]),
            "memory": str(vcpus * spec["ramPerVCPUGiB"]), "mode": body["mode"],
            "template": body.get("template") or "base", "httpPorts": [],
            "sshPublicKeys": [public_key] if public_key else [],
            "promoted": False, "k8s": False, "provisioningTime": None, "lastRestart": None,
        }
        self._machines[uuid] = machine
        self._bill[uuid] = (self._list_price(key, vcpus, disk, int(body.get("ephemeral_disk_gb") or 0)),
                            machine.created_at, None)
        self._boot[uuid] = (self.switches.boot_delay, self.ip_lag)
        self._booting.add(uuid)
        if self.switches.take("drop_create_reply"):
            raise DropReply
        private = f"-----BEGIN OPENSSH PRIVATE KEY-----\nFAKE-{uuid}\n-----END OPENSSH PRIVATE KEY-----\n"
        return json_response(200, {"uuid": uuid, "key": private, "identifier": identifier})

    def _delete(self, index: str) -> httpx.Response:
        live = list(self.instances)
        if not index.isdigit() or int(index) >= len(live):
            return _error(404, "not_found", "Instance not found")
        if self.switches.take("terminate_failures"):
            return _error(500, "internal_error", "Failed to delete instance")
        uuid = live[int(index)]
        self.deleted[uuid] = self.instances.pop(uuid)  # every later index moves down by one
        self._booting.discard(uuid)
        self._machines[uuid].destroy()
        rate, created, _ = self._bill[uuid]
        self._bill[uuid] = (rate, created, time.time())
        return json_response(200, {"message": f"Instance {index} deleted"})

    def _list_price(self, key: str, vcpus: int, disk: int, ephemeral: int) -> Decimal:
        """The spec's rate, extra vCPUs past the first option, disk past 100 GB, ephemeral disk (reference 3)."""
        def rate(name: str) -> Decimal:
            return Decimal(str(self.pricing.get(name, 0)))  # a test may drop a row from the table

        return (rate(key) + max(vcpus - self.specs[key]["vcpuOptions"][0], 0) * rate("additional_vcpus")
                + max(disk - 100, 0) * rate("disk_gb") + ephemeral * rate("ephemeral_disk_gb"))

    def _refresh(self, uuid: str, *, listing: bool = False) -> dict[str, Any]:
        """Move a booting record along with its machine; once it has an ip (or gave up) it is left alone, so
        tests may edit it (``port = 0``). Only a served list uses up ``ip_lag``."""
        record = self.instances[uuid]
        if uuid not in self._booting:
            return record
        machine = self._machines[uuid]
        delay, lag = self._boot[uuid]
        age = time.time() - machine.created_at
        if machine.failed:
            if age >= delay:
                record["status"] = "UNKNOWN"
                self._booting.discard(uuid)
        elif machine.ready and lag > 0:
            if listing:
                self._boot[uuid] = (delay, lag - 1)
            record["status"] = "RUNNING"  # and ip still null: the client must wait for both
        elif machine.ready:
            record.update(status="RUNNING", ip=machine.host, port=machine.port,
                          provisioningTime=dt.datetime.now(dt.timezone.utc).isoformat())
            self._booting.discard(uuid)
        elif age >= delay / 2:
            record["status"] = "STARTING"
        return record
