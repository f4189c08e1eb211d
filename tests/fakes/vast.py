"""A stateful fake of Vast.ai's REST API (reference/provider-apis.md section 1, checklist in section 6).

Emulated: offer search ``POST /api/v0/bundles/`` (filters eq/neq/gt/gte/lt/lte/in/notin, ``order``, ``limit``,
``type`` on-demand/ondemand/bid/reserved), create ``PUT /api/v0/asks/{id}/`` (``new_contract``; 404/410
``no_such_ask`` once taken), the v1 list ``GET /api/v1/instances/`` (``select_filters``, 25 a page,
``next_token``/``after_token``), show ``GET /api/v0/instances/{id}/`` (``{"instances": obj|null}``), destroy
``DELETE /api/v0/instances/{id}/``, per-instance keys ``/api/v0/instances/{id}/ssh/`` and
``GET /api/v0/users/current/``. Auth by Bearer or ``?api_key=``; 401 ``auth_error`` otherwise; 429 in plain text
with no Retry-After. Each machine's sessions carry ``CONTAINER_ID`` and ``CONTAINER_API_KEY`` (also the create
reply's ``instance_api_key``); that key may destroy its own instance and nothing else (403 otherwise), and each
instance records which key destroyed it (``destroyed_by``).

Each created instance is a real sshd (tests/fakes/base.py): ``actual_status`` is null until the boot delay ends,
"loading" until sshd answers, then "running" with ``ports``/``ssh_host``/``ssh_port`` filled. A failed boot reads
"exited". Deliberate simplifications: ``dph_total`` is stored per offer, not recomputed from
``allocated_storage``; rented offers never show in a search (the real server's default filters hide them).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shlex
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from .base import DropReply, FakeCloud, FakeMachine, billed, json_response, money, scoped_key

__all__ = ["DEFAULT_OFFERS", "FakeVast", "VastInstance"]

_CONTROL = {"order", "limit", "type", "allocated_storage", "disable_bundling", "extra_ids", "show_incompatible"}
_ALIASES = {"dph": "dph_total", "cuda_vers": "cuda_max_good"}
_V1_FILTERABLE = {"actual_status", "gpu_name", "verification", "id", "label", "intended_status", "machine_id"}
_KEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+) [A-Za-z0-9+/=]+( .*)?$")


def _offer(id: int, gpu: str, n: int, ram: int, dph: str, bid: str, rel: float, geo: str,
           **more: Any) -> dict[str, Any]:
    return {"id": id, "ask_contract_id": id, "bundle_id": id + 1_000_000, "machine_id": id // 10,
            "host_id": 9000 + id % 97,
            "gpu_name": gpu, "num_gpus": n, "gpu_ram": ram, "gpu_total_ram": ram * n, "gpu_arch": "nvidia",
            "cpu_cores": 16 * n, "cpu_cores_effective": 8.0 * n, "cpu_ram": 64000 * n, "disk_space": 200.0,
            "inet_down": 900.0, "inet_up": 800.0, "direct_port_count": 40, "public_ipaddr": "127.0.0.1",
            "dph_base": float(dph), "dph_total": float(dph), "min_bid": float(bid), "is_bid": False,
            "storage_cost": 0.1, "reliability": rel, "reliability2": rel, "verification": "verified",
            "rentable": True, "rented": False, "external": False, "score": 200.0 * rel, "cuda_max_good": 12.4,
            "driver_version": "550.54.15", "compute_cap": 890, "geolocation": geo, "duration": 2_592_000.0, **more}


DEFAULT_OFFERS: list[dict[str, Any]] = [
    _offer(4101, "RTX 4090", 1, 24564, "0.352", "0.201", 0.9951, "Texas, US"),
    _offer(4102, "RTX 4090", 1, 24564, "0.298", "0.150", 0.9412, "Quebec, CA"),
    _offer(4103, "RTX 4090", 2, 24564, "0.71", "0.40", 0.9987, "Oregon, US"),
    _offer(3101, "RTX 3090", 1, 24576, "0.19", "0.09", 0.991, "Bavaria, DE"),
    _offer(9101, "H100 SXM", 1, 81559, "2.401", "1.5", 0.998, "Virginia, US"),
    _offer(8101, "A100 SXM4", 1, 81920, "1.12", "0.70", 0.997, "Utah, US"),
    _offer(8102, "A100 SXM4", 1, 40960, "0.78", "0.45", 0.993, "Ohio, US"),
    _offer(4104, "RTX 4090", 1, 24564, "0.33", "0.18", 0.985, "Oslo, NO", direct_port_count=0),
    # The cheapest "4090" reports 12 GB: half a card (a shared GPU) or a misreport. `--gpu RTX_4090` must not rent
    # it; `--memory 12` may.
    _offer(4105, "RTX 4090", 1, 12282, "0.12", "0.06", 0.992, "Nevada, US"),
]


@dataclass
class VastInstance:
    row: dict[str, Any]
    machine: FakeMachine | None  # None: a row added by a test, whose status stays as written
    ask_id: int | None = None
    direct: bool = True
    created: float = field(default_factory=time.time)
    boot_delay: float = 0.0
    destroyed: bool = False
    destroyed_at: float | None = None  # billing ends here
    paused: bool = False
    scoped_key: str | None = None  # its CONTAINER_API_KEY: may destroy this instance and do nothing else
    destroyed_by: str | None = None  # "account" or "scoped": the key the destroy came with


def _error(status: int, error: str, msg: str, **more: Any) -> httpx.Response:
    return json_response(status, {"success": False, "error": error, "msg": msg, **more})


def _match(value: Any, ops: Any) -> bool:
    if not isinstance(ops, dict):
        ops = {"eq": ops}
    for op, want in ops.items():
        if op in ("neq", "notin"):
            ok = value != want if op == "neq" else value not in want
        elif value is None:
            ok = False
        elif op == "eq":
            ok = value == want
        elif op == "in":
            ok = value in want
        elif op in ("gt", "gte", "lt", "lte"):
            ok = {"gt": value > want, "gte": value >= want, "lt": value < want, "lte": value <= want}[op]
        else:
            raise ValueError(f"unknown operator {op!r}")
        if not ok:
            return False
    return True


class FakeVast(FakeCloud):
    name = "vast"

    def __init__(self, root: Path, *, api_key: str = "test-key", offers: list[dict[str, Any]] | None = None) -> None:
        super().__init__(root, api_key=api_key)
        book = DEFAULT_OFFERS if offers is None else offers
        self.offers: dict[int, dict[str, Any]] = {o["id"]: dict(o) for o in book}
        self.instances: dict[int, VastInstance] = {}
        self.bill_markup = Decimal(1)  # the billed dph_total is the offer's times this (a host raising its price)
        self.queries: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query args) of every request
        self._ids = itertools.count(7835610)
        self._offer_ids = itertools.count(60000)

    # -- helpers for tests ------------------------------------------------------------------------------------

    def add_offer(self, **fields: Any) -> dict[str, Any]:
        with self.lock:
            offer = {**DEFAULT_OFFERS[0], "id": next(self._offer_ids), **fields}
            self.offers[offer["id"]] = offer
            return offer

    def add_instance(self, **fields: Any) -> VastInstance:
        """A row with no machine behind it (list/paging tests): running, labelled as given."""
        with self.lock:
            iid = next(self._ids)
            row = {**self._row(iid, DEFAULT_OFFERS[0], {}, "ssh_direc ssh_proxy"), "actual_status": "running", **fields}
            self.instances[iid] = inst = VastInstance(row=row, machine=None)
            return inst

    def instance(self, instance_id: int | str) -> VastInstance:
        with self.lock:
            inst = self.instances[int(instance_id)]
            self._refresh(inst)
            return inst

    def running(self) -> list[VastInstance]:
        with self.lock:
            return [self.instance(i) for i, inst in self.instances.items() if not inst.destroyed]

    def bills(self) -> dict[str, Decimal]:
        """Each instance at its billed ``dph_total``, created to destroyed; a paused bid bills on (its disk, at
        most the full rate: counted in full here)."""
        with self.lock:
            return {str(i): billed(Decimal(str(inst.row["dph_total"])), inst.created, inst.destroyed_at)
                    for i, inst in self.instances.items() if inst.machine is not None}

    def outbid(self, instance_id: int | str) -> None:
        """A bid that lost its machine: paused, data kept, Vast still means to resume it (reference 1.9)."""
        with self.lock:
            inst = self.instances[int(instance_id)]
            inst.paused = True
            inst.row.update(is_bid=True, cur_state="stopped", next_state="running", status_msg="outbid: paused")
            machine = inst.machine
        if machine is not None:
            machine.destroy()  # the container stops: its processes and SSH sessions end (the row stays, billed)

    def too_many(self) -> httpx.Response:
        return httpx.Response(429, text="API requests too frequent", headers={"content-type": "text/plain"})

    # -- routing ----------------------------------------------------------------------------------------------

    def dispatch(self, request: httpx.Request, body: Any) -> httpx.Response:
        path, method = request.url.path, request.method
        self.queries.append((method, path, dict(request.url.params)))
        if not self.authorized(request):
            return self._scoped(request)
        if (method, path.rstrip("/")) == ("POST", "/api/v0/bundles"):
            return self._search(body or {})
        if (method, path.rstrip("/")) == ("GET", "/api/v0/users/current"):
            return json_response(200, {"id": 123456, "email": "test@example.com", "credit": 25.0, "ssh_key": ""})
        if (method, path.rstrip("/")) == ("GET", "/api/v1/instances"):
            return self._list(request.url.params)
        if m := re.fullmatch(r"/api/v0/asks/(\d+)/?", path):
            return self._create(int(m[1]), body or {}) if method == "PUT" else _error(405, "bad_method", method)
        if m := re.fullmatch(r"/api/v0/instances/(\d+)/ssh/?", path):
            return self._ssh_key(int(m[1]), method, body or {})
        if m := re.fullmatch(r"/api/v0/instances/(\d+)/?", path):
            if method == "GET":
                inst = self._live(int(m[1]))
                return json_response(200, {"instances": inst.row if inst else None})
            if method == "DELETE":
                return self._destroy(int(m[1]), by="account")
        return _error(404, "not_found", f"no route {method} {path}")

    def _scoped(self, request: httpx.Request) -> httpx.Response:
        """A request without the account key: an instance's own CONTAINER_API_KEY may destroy that instance (the
        fake grants that much of "stop or destroy"; 2026-11-29), anything else is refused."""
        key = self.bearer(request)
        owner = next((iid for iid, inst in self.instances.items() if key and inst.scoped_key == key), None)
        if owner is None:
            return _error(401, "auth_error", "Invalid user key")
        m = re.fullmatch(r"/api/v0/instances/(\d+)/?", request.url.path)
        if request.method != "DELETE" or m is None or int(m[1]) != owner:
            return _error(403, "forbidden", "this instance key may only stop or destroy its own instance")
        return self._destroy(owner, by="scoped")

    def _search(self, body: dict[str, Any]) -> httpx.Response:
        kind = body.get("type", "on-demand")
        if kind not in ("on-demand", "ondemand", "bid", "reserved"):
            return _error(400, "invalid_args", f"invalid type {kind!r}")
        try:
            found = [dict(o, is_bid=kind == "bid") for o in self.offers.values() if not o["rented"]
                     and all(_match(self._field(o, k), ops) for k, ops in body.items() if k not in _CONTROL)]
        except (TypeError, ValueError) as exc:
            return _error(400, "invalid_args", f"bad query: {exc}")
        for col, direction in reversed(body.get("order") or [["score", "desc"]]):
            col = _ALIASES.get(col, col)
            found.sort(key=lambda o: (o.get(col) is None, o.get(col) or 0), reverse=direction == "desc")
        return json_response(200, {"offers": found[: int(body.get("limit") or 64)]})

    @staticmethod
    def _field(offer: dict[str, Any], name: str) -> Any:
        if name == "verified":
            return offer.get("verification") == "verified"
        return offer.get(_ALIASES.get(name, name))

    def _create(self, ask_id: int, body: dict[str, Any]) -> httpx.Response:
        offer = self.offers.get(ask_id)
        if offer is not None and (self.switches.take("take_offer_on_create") or self.switches.take("capacity_errors")):
            offer["rented"] = True  # someone else rented it between the search and this call
        if offer is None or offer["rented"]:
            if body.get("cancel_unavail"):
                return _error(410, "no_such_ask", f"error 410/3907: Instance type by id {ask_id} is no longer "
                              "available.", ask_id=ask_id)
            return _error(404, "invalid_args", f"error 404/3603: no_such_ask Instance type by id {ask_id} is not "
                          "available.", ask_id=ask_id)
        if not body.get("image") or len(str(body["image"])) > 1024:
            return _error(400, "invalid_args", "error 400/3467: image is required (at most 1024 chars)", ask_id=ask_id)
        if float(body.get("disk") or 0) < 8 or len(str(body.get("label") or "")) > 256:
            return _error(400, "invalid_args", "error 400/3467: disk must be >= 8, label <= 256 chars", ask_id=ask_id)
        price = body.get("price")
        if price is not None and not (max(0.001, offer["min_bid"]) <= float(price) <= 128):
            return _error(400, "invalid_price", f"error 400/3467: bid {price} below min_bid {offer['min_bid']}",
                          ask_id=ask_id)
        onstart = body.get("onstart")
        if onstart is not None and len(str(onstart)) + len(str(body.get("args") or "")) > 4096:
            return _error(400, "invalid_args", "error 400/3467: onstart and args may hold 4096 characters",
                          ask_id=ask_id)
        offer["rented"] = True
        iid = next(self._ids)
        runtype = str(body.get("runtype") or "ssh_proxy")
        row = self._row(iid, offer, body, runtype)
        rate = Decimal(str(price if price is not None else offer["dph_total"])) * self.bill_markup
        row.update(dph_total=money(rate), is_bid=price is not None)
        key = scoped_key()  # the create reply's instance_api_key, and CONTAINER_API_KEY on the machine
        # Vast runs onstart as a shell script when the container starts, in the container's environment.
        machine = self.machines.create(boot_delay=self.switches.boot_delay, fail=self.switches.take("boot_fails"),
                                       env={"CONTAINER_ID": str(iid), "CONTAINER_API_KEY": key},
                                       gpu=("vast", offer["gpu_name"]), count=int(offer["num_gpus"]),
                                       start=["bash", "-c", str(onstart)] if onstart else None)
        self.instances[iid] = VastInstance(row=row, machine=machine, ask_id=ask_id, boot_delay=self.switches.boot_delay,
                                           direct="ssh_direc" in runtype and offer["direct_port_count"] > 0,
                                           scoped_key=key)
        if self.switches.take("drop_create_reply"):
            raise DropReply()
        return self.created(json_response(200, {"success": True, "new_contract": iid, "instance_api_key": key}))

    def _row(self, iid: int, offer: dict[str, Any], body: dict[str, Any], runtype: str) -> dict[str, Any]:
        keep = ("machine_id", "host_id", "num_gpus", "gpu_name", "gpu_ram", "cpu_ram", "inet_up", "inet_down",
                "geolocation", "verification", "dph_base", "min_bid", "public_ipaddr")
        return {"id": iid, **{k: offer.get(k) for k in keep}, "gpu_totalram": offer.get("gpu_total_ram"),
                "reliability2": offer.get("reliability2"), "dph_total": offer.get("dph_total"), "is_bid": False,
                "actual_status": None, "intended_status": "running", "cur_state": "running",
                "next_state": "running", "status_msg": None, "label": body.get("label"),
                "image_uuid": body.get("image"), "image_runtype": runtype, "image_args": body.get("args") or [],
                "extra_env": _extra_env(body.get("env")), "onstart": body.get("onstart"),
                "local_ipaddrs": "127.0.0.1\n", "ssh_host": None, "ssh_port": None, "ssh_idx": None,
                "direct_port_start": 20000, "direct_port_end": 20040, "ports": {}, "start_date": time.time(),
                "end_date": None, "uptime_mins": 0, "disk_space": float(body.get("disk") or 10),
                "template_id": None, "volume_info": None}

    def _refresh(self, inst: VastInstance) -> None:
        """Status from the machine: null while provisioning, loading until sshd answers, then running."""
        machine, row = inst.machine, inst.row
        if machine is None or inst.destroyed:
            return
        row["uptime_mins"] = int((time.time() - inst.created) / 60)
        running = machine.ready and not inst.paused
        if inst.paused or (machine.failed and time.time() - inst.created >= inst.boot_delay):
            row.update(actual_status="exited", status_msg=row["status_msg"] or "container failed to start")
        elif running:
            row["actual_status"], row["status_msg"] = "running", "success, running"
        elif time.time() - inst.created >= inst.boot_delay:
            row["actual_status"], row["status_msg"] = "loading", "Pulling image"
        port = str(machine.port) if running else None
        row["ports"] = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": port}]} if port and inst.direct else {}
        row["ssh_host"], row["ssh_port"] = (machine.host, machine.port) if running else (None, None)

    def _live(self, iid: int) -> VastInstance | None:
        inst = self.instances.get(iid)
        if inst is None or inst.destroyed:
            return None
        self._refresh(inst)
        return inst

    def _list(self, params: httpx.QueryParams) -> httpx.Response:
        try:
            filters = json.loads(params.get("select_filters") or "{}")
            limit = int(json.loads(params.get("limit") or "25"))
            token = params.get("after_token")
            after = json.loads(base64.urlsafe_b64decode(token))["after_id"] if token else -1
        except (ValueError, KeyError, TypeError):
            return _error(400, "invalid_token", "Invalid after_token or query parameters")
        if limit > 25 or limit < 1:
            return _error(400, "invalid_request", "Error in query parameters: limit must be between 1 and 25")
        if bad := [k for k in filters if k not in _V1_FILTERABLE]:
            return _error(400, "invalid_request", f"Error in query parameters: {bad[0]} is not a valid search key")
        live = [inst for inst in (self._live(i) for i in sorted(self.instances)) if inst is not None]
        counts: dict[str, int] = {}
        for inst in live:
            counts[inst.row["label"] or ""] = counts.get(inst.row["label"] or "", 0) + 1
        rows = [inst.row for inst in live
                if inst.row["id"] > after and all(_match(inst.row.get(k), ops) for k, ops in filters.items())]
        page, more = rows[:limit], len(rows) > limit
        last = json.dumps({"after_id": page[-1]["id"]}).encode() if more else None
        next_token = base64.urlsafe_b64encode(last).decode() if last else None
        return json_response(200, {"success": True, "instances_found": len(page), "total_instances": len(live),
                                   "label_counts": counts, "next_token": next_token, "instances": page})

    def _ssh_key(self, iid: int, method: str, body: dict[str, Any]) -> httpx.Response:
        inst = self._live(iid)
        if inst is None:
            return _error(404, "no_such_instance", f"Instance {iid} not found.")
        if method == "GET":
            keys = [{"id": n, "name": f"key{n}", "public_key": k}
                    for n, k in enumerate(inst.machine.authorized if inst.machine else [], 1)]
            return json_response(200, {"success": True, "ssh_keys": json.dumps(keys)})
        key = str(body.get("ssh_key") or "").strip()
        if not key:
            return _error(400, "no_ssh_key", "No ssh key provided")
        if not _KEY.match(key):
            return _error(400, "invalid_args", "Invalid ssh key")
        if inst.machine is not None:
            inst.machine.authorize(key)
        return json_response(200, {"success": True, "msg": "SSH key attached successfully"})

    def _destroy(self, iid: int, *, by: str) -> httpx.Response:
        if self.switches.take("terminate_failures"):
            return _error(500, "server_error", "Internal error, try again")
        inst = self._live(iid)
        if inst is None:
            return _error(404, "not_found", "Instance not found")
        inst.destroyed, inst.destroyed_at, inst.destroyed_by = True, time.time(), by
        if inst.machine is not None:
            inst.machine.destroy()
        if inst.ask_id in self.offers:
            self.offers[inst.ask_id]["rented"] = False  # the machine is for rent again
        return json_response(200, {"success": True, "msg": "Instance destroyed successfully"})


def _extra_env(env: Any) -> list[list[str]]:
    """The non-port part of a create's env, as the [k, v] pairs instance rows carry (reference 1.4, 1.5)."""
    if isinstance(env, dict):
        return [[str(k), str(v)] for k, v in env.items() if not str(k).startswith(("-p ", "-v ", "-n ", "-h "))]
    words, pairs = shlex.split(str(env or "")), []
    for flag, value in itertools.pairwise(words):
        if flag == "-e" and "=" in value:
            pairs.append(value.split("=", 1))
    return pairs
