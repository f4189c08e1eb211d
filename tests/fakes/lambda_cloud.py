"""A stateful fake of Lambda Cloud's API 1.10.0 (reference/provider-apis.md, section 4 and the checklist in 6).

What it keeps faithful:

- Every body is ``{"data": ...}``; every error ``{"error": {"code", "message", "suggestion"?}}`` with the
  1.10.0 codes and statuses (4.1): 401 ``global/invalid-api-key``, 400 ``global/invalid-parameters``,
  400 ``instance-operations/launch/insufficient-capacity``, 404 ``global/object-does-not-exist`` (instances and
  launch resources) and ``global/not-found`` (ssh-key delete). A 429 is Cloudflare's plain text
  ``error code: 1015`` (4.2), with ``Retry-After`` only when ``switches.retry_after`` is set (the header is
  UNCONFIRMED).
- Auth: ``Authorization: Bearer KEY``, ``Basic base64(KEY:)`` (curl ``-u KEY:``) or ``Basic KEY`` (4.1).
- ``GET /api/v1/instance-types`` is a map keyed by type name, every type listed, with
  ``regions_with_capacity_available`` from ``capacity`` (type -> regions), possibly empty. A launch outside those
  regions answers 400 insufficient-capacity (4.3, 4.4).
- Launch takes exactly one ``ssh_key_names`` entry, resolved at launch against the account's keys (the key goes
  into the machine's authorized_keys then; deleting or adding account keys later does not reach it, 4.8); a
  ``quantity`` over 1 is refused; ``name`` at most 64 characters; tag keys ``^[a-z][a-z0-9-:]+$``.
- Status ``booting`` -> ``active`` (with ``ip``) once the machine's sshd answers; terminate makes it
  ``terminating`` for ``terminating_polls`` reads, then ``terminated`` for ``terminated_polls`` reads, then 404
  (4.5, 4.7). ``GET /instances`` leaves terminated rows out. No stop.
- SSH on ``ip``:22: each instance gets a loopback address of its own (127.x.y.z), its sshd on port 22 there (so
  the fake must run as root, or with CAP_NET_BIND_SERVICE).
- SSH keys are account-wide, names unique (400 "Key name must be unique"), at most 1,024, deleted by id (4.8).
  ``user_keys`` holds the account's own keys (a laptop's), which no client of ours may delete; ``leaked()`` is
  every other key still there.

Chosen where the reference is silent (2026-12-06): a repeat terminate of a ``terminating`` or ``terminated``
instance answers 200 and lists it again; a terminate naming one unknown id fails the whole request with 404; an
instance that never boots (``switches.boot_fails``) goes ``booting`` -> ``unhealthy`` after the boot delay and
stays there; deleting a key a live instance was launched with is allowed (1.10.0 lists no ``key-in-use``).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import re
import secrets
import socket
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from .base import DropReply, FakeCloud, FakeMachine, billed, json_response

__all__ = ["INSTANCE_TYPES", "REGIONS", "FakeLambda"]

REGIONS = {"us-west-1": "California, USA", "us-east-1": "Virginia, USA", "us-south-1": "Texas, USA",
           "europe-central-1": "Germany"}


def _type(name: str, description: str, gpu: str, cents: int, vcpus: int, memory: int, storage: int,
          gpus: int) -> dict[str, Any]:
    return {"name": name, "description": description, "gpu_description": gpu, "price_cents_per_hour": cents,
            "specs": {"vcpus": vcpus, "memory_gib": memory, "storage_gib": storage, "gpus": gpus}}


#: Shaped like Lambda's catalog (SkyPilot's v7 prices, 4.3), with a type burst's catalog does not know (A10).
INSTANCE_TYPES: dict[str, dict[str, Any]] = {t["name"]: t for t in (
    _type("gpu_1x_a10", "1x A10 (24 GB PCIe)", "A10 (24 GB PCIe)", 75, 30, 200, 1400, 1),
    _type("gpu_1x_a6000", "1x A6000 (48 GB)", "A6000 (48 GB)", 80, 14, 46, 512, 1),
    _type("gpu_1x_a100", "1x A100 (40 GB PCIe)", "A100 (40 GB PCIe)", 129, 30, 200, 512, 1),
    _type("gpu_8x_a100_80gb_sxm4", "8x A100 (80 GB SXM4)", "A100 (80 GB SXM4)", 1432, 240, 1800, 20000, 8),
    _type("gpu_1x_h100_pcie", "1x H100 (80 GB PCIe)", "H100 (80 GB PCIe)", 249, 26, 200, 1000, 1),
    _type("gpu_1x_h100_sxm5", "1x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 329, 26, 225, 2750, 1),
    _type("gpu_2x_h100_sxm5", "2x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 658, 52, 450, 5500, 2),
)}

#: Where each type can be had now; the rest of the catalog has none anywhere.
CAPACITY: dict[str, list[str]] = {
    "gpu_1x_a10": ["us-west-1"],
    "gpu_1x_a6000": ["us-east-1"],
    "gpu_1x_h100_pcie": ["us-west-1", "us-east-1"],
    "gpu_1x_h100_sxm5": ["us-south-1"],
    "gpu_2x_h100_sxm5": ["us-south-1"],
}

_TAG_KEY = re.compile(r"^[a-z][a-z0-9-:]+$")
_ACTIONS = ("migrate", "rebuild", "restart", "cold_reboot", "terminate")


def _error(status: int, code: str, message: str, suggestion: str | None = None,
           headers: dict[str, str] | None = None) -> httpx.Response:
    error = {"code": code, "message": message, **({"suggestion": suggestion} if suggestion else {})}
    return json_response(status, {"error": error}, headers)


def _data(payload: Any, status: int = 200) -> httpx.Response:
    return json_response(status, {"data": payload})


def _free_loopback() -> str:
    """A 127.x.y.z address whose port 22 is free now: an instance's public IP, as Lambda gives each its own."""
    for _ in range(100):
        address = f"127.{secrets.randbelow(254) + 1}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind((address, 22))
            return address
    raise RuntimeError("no loopback address with port 22 free (the Lambda fake needs root or CAP_NET_BIND_SERVICE)")


class FakeLambda(FakeCloud):
    """Lambda Cloud's API with real sshd machines behind it. Tests change ``instance_types`` and ``capacity`` to
    shape the catalog, ``keys`` (the account's, by id) and ``terminating_polls``/``terminated_polls``, and read
    ``running()``, ``leaked()``, ``instance(id)`` and ``machine(id)``."""

    name = "lambda"

    def __init__(self, root: Path, *, api_key: str = "test-key") -> None:
        super().__init__(root, api_key=api_key)
        self.instance_types: dict[str, dict[str, Any]] = copy.deepcopy(INSTANCE_TYPES)
        self.capacity: dict[str, list[str]] = copy.deepcopy(CAPACITY)
        self.terminating_polls = 1  # reads of a terminated instance that still say terminating
        self.terminated_polls = 1  # then reads that say terminated, before the 404
        self.keys: dict[str, dict[str, str]] = {}  # the account's SSH keys by id
        self.user_keys: set[str] = set()  # ids of keys the user made (a laptop's): never ours to delete
        self.instances: dict[str, dict[str, Any]] = {}  # id -> row, terminated ones included until their 404
        self._reads_left: dict[str, int] = {}  # id -> reads before a terminated instance answers 404
        self._machines: dict[str, FakeMachine] = {}
        self._bill: dict[str, tuple[Decimal, float, float | None]] = {}  # id -> ($/h, launched, terminated)
        self.add_key("my-laptop", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq1aptopKeyOfTheUserX+x1 me@laptop", user=True)

    # -- inspection and setup --------------------------------------------------------------------------------

    def add_key(self, name: str, public_key: str, *, user: bool = False) -> str:
        key_id = secrets.token_hex(16)
        with self.lock:
            self.keys[key_id] = {"id": key_id, "name": name, "public_key": public_key}
            if user:
                self.user_keys.add(key_id)
        return key_id

    def running(self) -> list[dict[str, Any]]:
        """Instances still billing: every one not yet terminated."""
        with self.lock:
            return [dict(self._refresh(i)) for i, row in self.instances.items()
                    if row["status"] not in ("terminating", "terminated")]

    def leaked(self) -> list[str]:
        """Names of the account's keys that are not the user's own: a job key still there is a leak."""
        with self.lock:
            return sorted(k["name"] for i, k in self.keys.items() if i not in self.user_keys)

    def instance(self, instance_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self._refresh(instance_id) if instance_id in self.instances else None

    def machine(self, instance_id: str) -> FakeMachine:
        return self._machines[instance_id]

    def bills(self) -> dict[str, Decimal]:
        """Each instance at its type's price, from the launch request to the terminate (4.9, read conservatively)."""
        with self.lock:
            return {i: billed(*bill) for i, bill in self._bill.items()}

    # -- serving ---------------------------------------------------------------------------------------------

    def authorized(self, request: httpx.Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme == "Bearer":
            return value == self.api_key
        if scheme == "Basic":
            with contextlib.suppress(ValueError):
                if base64.b64decode(value, validate=True).decode() in (f"{self.api_key}:", self.api_key):
                    return True
            return value == self.api_key  # "Basic <key>", the raw key (4.1)
        return False

    def too_many(self) -> httpx.Response:
        after = self.switches.retry_after
        return httpx.Response(429, text="error code: 1015",
                              headers={"retry-after": f"{after:g}"} if after is not None else None)

    def dispatch(self, request: httpx.Request, body: Any) -> httpx.Response:
        path = request.url.path.rstrip("/")
        method = request.method
        if not path.startswith("/api/v1/"):
            return _error(404, "global/not-found", "Not found.")
        if not self.authorized(request):
            return _error(401, "global/invalid-api-key", "API key was invalid, expired, or deleted.",
                          "Check your API key or create a new one, then try again.")
        path = path.removeprefix("/api/v1")
        body = body if isinstance(body, dict) else {}
        if method == "GET" and path == "/instance-types":
            return _data({name: {"instance_type": kind, "regions_with_capacity_available":
                                 [{"name": r, "description": REGIONS.get(r, r)} for r in self.capacity.get(name, [])]}
                          for name, kind in self.instance_types.items()})
        if method == "GET" and path == "/regions":
            return _data([{"name": n, "description": d} for n, d in REGIONS.items()])
        if method == "GET" and path == "/instances":
            return _data([self._refresh(i) for i, row in list(self.instances.items())
                          if row["status"] != "terminated"])
        if method == "GET" and path.startswith("/instances/"):
            return self._get(path.removeprefix("/instances/"))
        if method == "POST" and path == "/instance-operations/launch":
            return self._launch(body)
        if method == "POST" and path == "/instance-operations/terminate":
            return self._terminate(body)
        if method == "GET" and path == "/ssh-keys":
            return _data(list(self.keys.values()))
        if method == "POST" and path == "/ssh-keys":
            return self._add_key(body)
        if method == "DELETE" and path.startswith("/ssh-keys/"):
            key_id = path.removeprefix("/ssh-keys/")
            if self.keys.pop(key_id, None) is None:
                return _error(404, "global/not-found", "SSH key not found.")
            self.user_keys.discard(key_id)
            return _data({})
        return _error(404, "global/not-found", "Not found.")

    def _get(self, instance_id: str) -> httpx.Response:
        row = self.instances.get(instance_id)
        if row is None:
            return _error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        if instance_id in self._reads_left:  # terminated by a request: its last reads, then 404
            left = self._reads_left[instance_id]
            if left <= 0:
                del self.instances[instance_id]
                del self._reads_left[instance_id]
                return _error(404, "global/object-does-not-exist", "Specified instance does not exist.")
            row["status"] = "terminating" if left > self.terminated_polls else "terminated"
            self._reads_left[instance_id] = left - 1
        return _data(self._refresh(instance_id))

    def _add_key(self, body: dict[str, Any]) -> httpx.Response:
        name = body.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            return _error(400, "global/invalid-parameters", "Invalid request data.")
        if any(k["name"] == name for k in self.keys.values()):
            return _error(400, "global/invalid-parameters", "Key name must be unique")
        if len(self.keys) >= 1024:
            return _error(400, "global/invalid-parameters", "Too many SSH keys.")
        public_key = body.get("public_key")
        if public_key is None:
            # Lambda generates a pair and returns the private half once; the client of ours never asks for one.
            key_id = self.add_key(name, f"ssh-rsa AAAAFAKE{secrets.token_hex(8)} generated")
            return _data({**self.keys[key_id], "private_key": "-----BEGIN RSA PRIVATE KEY-----\nFAKE\n"
                                                             "-----END RSA PRIVATE KEY-----\n"})
        if not isinstance(public_key, str) or len(public_key) > 4096 or len(public_key.split()) < 2:
            return _error(400, "global/invalid-parameters", "Invalid request data.")
        return _data(self.keys[self.add_key(name, public_key.strip())])

    def _launch(self, body: dict[str, Any]) -> httpx.Response:
        kind = self.instance_types.get(str(body.get("instance_type_name")))
        if kind is None:
            return _error(404, "global/object-does-not-exist", "Specified instance type does not exist.",
                          "Check the instance type name.")
        region = str(body.get("region_name") or "")
        names = body.get("ssh_key_names")
        if not isinstance(names, list) or len(names) != 1:
            return _error(400, "global/invalid-parameters", "Currently, exactly one SSH key must be specified.")
        if int(body.get("quantity") or 1) > 1:
            return _error(400, "global/invalid-parameters", "Requested too many instances.")
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 64):
            return _error(400, "global/invalid-parameters", "Invalid request data.")
        tags = body.get("tags") or []
        if not all(isinstance(t, dict) and _TAG_KEY.match(str(t.get("key"))) and len(str(t.get("key"))) <= 55
                   and len(str(t.get("value"))) <= 128 for t in tags):
            return _error(400, "global/invalid-parameters", "Invalid request data.")
        key = next((k for k in self.keys.values() if k["name"] == names[0]), None)
        if key is None:
            return _error(404, "global/object-does-not-exist", "Specified SSH key does not exist.",
                          "Check the SSH key name.")
        if (self.switches.take("capacity_errors") or self.switches.take("take_offer_on_create")
                or region not in self.capacity.get(kind["name"], [])):
            return _error(400, "instance-operations/launch/insufficient-capacity",
                          "Not enough capacity to fulfill launch request.", "Try another region or instance type.")
        fail = self.switches.take("boot_fails")
        parsed = re.match(r"^\s*(\S+)", str(kind["gpu_description"]))
        model = {"A6000": "RTX_A6000", "H100": "H100"}.get(parsed[1] if parsed else "")
        if parsed and parsed[1] == "A100":
            model = "A100_80GB" if "80 GB" in kind["gpu_description"] else "A100_40GB"
        address = _free_loopback()
        machine = self.machines.create(boot_delay=self.switches.boot_delay, fail=fail, model=model,
                                       count=int(kind["specs"]["gpus"]), listen=(address, 22))
        machine.authorize(key["public_key"])  # resolved now: a later delete of the account key does not reach it
        instance_id = secrets.token_hex(16)  # 32 hex characters (4.4)
        self.instances[instance_id] = {
            "id": instance_id, "name": name, "status": "booting", "ip": None, "private_ip": None,
            "hostname": None, "region": {"name": region, "description": REGIONS.get(region, region)},
            "instance_type": copy.deepcopy(kind), "ssh_key_names": [key["name"]], "file_system_names": [],
            "tags": [{"key": str(t["key"]), "value": str(t["value"])} for t in tags],
            "actions": {a: {"available": False, "reason_code": "vm-has-not-launched"} for a in _ACTIONS},
            "jupyter_token": None, "jupyter_url": None, "_address": address,
        }
        self._machines[instance_id] = machine
        self._bill[instance_id] = (Decimal(kind["price_cents_per_hour"]) / 100, machine.created_at, None)
        if self.switches.take("drop_create_reply"):
            raise DropReply
        return self.created(_data({"instance_ids": [instance_id]}))

    def _terminate(self, body: dict[str, Any]) -> httpx.Response:
        ids = body.get("instance_ids")
        if not isinstance(ids, list) or not ids:
            return _error(400, "global/invalid-parameters", "Invalid request data.")
        if any(i not in self.instances for i in ids):
            return _error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        if self.switches.take("terminate_failures"):
            return _error(500, "provider/internal-unavailable", "Provider unavailable", "Try again shortly")
        done = []
        for instance_id in ids:
            row = self.instances[instance_id]
            if instance_id not in self._reads_left:
                self._reads_left[instance_id] = self.terminating_polls + self.terminated_polls
                row["status"] = "terminating"
                self._machines[instance_id].destroy()
                rate, launched, _ = self._bill[instance_id]
                self._bill[instance_id] = (rate, launched, time.time())  # billing stops at terminate (4.9)
            done.append(self._public(row))
        return _data({"terminated_instances": done})

    def _refresh(self, instance_id: str) -> dict[str, Any]:
        """Move a booting row along with its machine: active with its ip once sshd answers."""
        row = self.instances[instance_id]
        machine = self._machines[instance_id]
        if row["status"] == "booting":
            if machine.failed and time.time() - machine.created_at >= self.switches.boot_delay:
                row["status"] = "unhealthy"
            elif machine.ready:
                row.update(status="active", ip=machine.host, private_ip="10.0.0.2",
                           hostname=machine.host.replace(".", "-") if machine.host else None,
                           actions={a: {"available": True} for a in _ACTIONS})
        return self._public(row)

    @staticmethod
    def _public(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if not k.startswith("_")}
