"""A stateful fake of RunPod's GraphQL API (reference/provider-apis.md 2.1, checklist in 6).

One ``POST /graphql`` route. The operation is found in the query text (``podFindAndDeployOnDemand``,
``podRentInterruptable``, ``podTerminate``, ``podStop``, ``podResume``, ``myself``, ``gpuTypes``, ``pod``), its input
is read from ``variables`` (runpodctl's way) or from simple inlined literals (runpod-python's way), and the answer
holds only the fields the query selected, as a GraphQL server's would. Bearer and ``?api_key=`` are both accepted;
a bad key is HTTP 401; business errors are ``{"errors": [{"message"}], "data": null}`` in an HTTP 200.
Pods have ``runtime: null`` until their machine (a real sshd, tests/fakes/base.py) answers; ``env`` comes back as
``"KEY=value"`` strings and the ``PUBLIC_KEY`` one is authorized on the machine, as RunPod's images do. The
machine's sessions carry ``RUNPOD_POD_ID`` and a pod-scoped ``RUNPOD_API_KEY``, which may stop or terminate that pod
and nothing else (403 otherwise); :meth:`FakeRunPod.terminated_by` tells which key ended a pod.
The 429 shape of RunPod GraphQL is UNCONFIRMED: HTTP 429, with ``Retry-After`` when ``switches.retry_after`` is set.

Secure and community cloud are two products: each GPU type has, per cloud, its own on-demand and spot $/GPU-hour
and its own stock per GPU count (``set_cloud`` changes them). ``lowestPrice(input: {secureCloud})`` answers for one
cloud, and a create is placed on the ``cloudType`` it names, billed at that cloud's price, or refused with RunPod's
capacity error when that cloud has no stock (``sold_out_on_create`` takes the last GPUs between search and create).
A community pod has a public IP only when created with ``supportPublicIp: true`` (2.1); without one its port 22 is
not public, and direct SSH has nowhere to go.
"""

from __future__ import annotations

import copy
import json
import random
import re
import shlex
import string
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from .base import DropReply, FakeCloud, FakeMachine, billed, json_response, money, scoped_key

__all__ = ["CAPACITY_ERROR", "CLOUDS", "DEFAULT_GPU_TYPES", "FakeRunPod"]

CAPACITY_ERROR = ("There are no longer any instances available with the requested specifications. "
                  "Please refresh and try again.")
_OPS = ("podFindAndDeployOnDemand", "podRentInterruptable", "podTerminate", "podStop", "podResume", "myself",
        "gpuTypes", "pod")
_TOKEN = r'\$\w+|"(?:[^"\\]|\\.)*"|[-\w.]+'


CLOUDS = ("SECURE", "COMMUNITY")


def _cloud(price: str, spot: str, stock: dict[int, str]) -> dict[str, Any]:
    """One cloud's side of a GPU type: its on-demand and spot $/GPU-hour and its stock by GPU count."""
    return {"price": Decimal(price), "spot": Decimal(spot), "stock": dict(stock)}


def _gpu(gpu_id: str, display: str, memory: int, *, secure: dict[str, Any] | None,
         community: dict[str, Any] | None) -> dict[str, Any]:
    """A gpuTypes entry. Secure and community cloud are two products with their own prices and stock (2.1: the
    type's ``securePrice``/``communityPrice`` and spot prices beside them); ``_clouds`` is the fake's own book,
    which ``lowestPrice(input: {gpuCount, secureCloud})`` and the creates read."""
    clouds = {name: cloud for name, cloud in zip(CLOUDS, (secure, community), strict=True) if cloud is not None}
    counts = [n for cloud in clouds.values() for n in cloud["stock"]]
    entry: dict[str, Any] = {"id": gpu_id, "displayName": display, "memoryInGb": memory,
                             "secureCloud": secure is not None, "communityCloud": community is not None,
                             "maxGpuCount": max(counts), "_clouds": clouds}
    for name, cloud in clouds.items():
        entry[f"{name.lower()}Price"] = money(cloud["price"])
        entry[f"{name.lower()}SpotPrice"] = money(cloud["spot"])
    return entry


DEFAULT_GPU_TYPES: list[dict[str, Any]] = [
    _gpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, secure=_cloud("0.69", "0.44", {1: "High", 2: "High", 4: "Medium"}),
         community=_cloud("0.34", "0.29", {1: "High", 2: "Medium", 4: "Low"})),
    _gpu("NVIDIA GeForce RTX 3090", "RTX 3090", 24, secure=_cloud("0.43", "0.26", {1: "Medium", 2: "Low"}),
         community=_cloud("0.22", "0.17", {1: "Medium", 2: "Low", 4: "None"})),
    _gpu("NVIDIA A100-SXM4-80GB", "A100 SXM", 80, secure=_cloud("1.89", "1.19", {1: "Medium", 2: "Low", 8: "Low"}),
         community=_cloud("1.74", "1.05", {1: "Low"})),
    _gpu("NVIDIA H100 80GB HBM3", "H100 SXM", 80, secure=_cloud("2.99", "1.99", {1: "Low", 8: "Low"}),
         community=_cloud("2.69", "1.75", {1: "Low"})),
    _gpu("AMD Instinct MI300X OAM", "MI300X", 192, secure=_cloud("2.49", "1.99", {1: "High"}),  # not in our catalog
         community=None),
]


class FakeRunPod(FakeCloud):
    name = "runpod"

    def __init__(self, root: Path, *, api_key: str = "test-key", gpu_types: list[dict[str, Any]] | None = None
                 ) -> None:
        super().__init__(root, api_key=api_key)
        self.gpu_types = copy.deepcopy(gpu_types if gpu_types is not None else DEFAULT_GPU_TYPES)
        self.pods: dict[str, dict[str, Any]] = {}  # every pod ever created, terminated ones included
        self.pod_machines: dict[str, FakeMachine] = {}
        self.bill_markup = Decimal(1)  # costPerHr = quoted price x this (a host billing above the quote)
        #: cloud -> the next N creates on it find its last GPUs of that type just taken: a capacity error, and the
        #: stock of that type on that cloud stays gone from later searches (stock that moved since the search).
        self.sold_out_on_create: dict[str, int] = {}
        self.cost_as_string = False  # send costPerHr as "0.69" (REST v1's docs example) instead of 0.69
        self._rng = random.Random(0)

    # -- helpers for tests ------------------------------------------------------------------------------------

    def running(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._render(p) for p in self.pods.values() if p["desiredStatus"] != "TERMINATED"]

    def bills(self) -> dict[str, Decimal]:
        """Each pod at its ``costPerHr``, created to terminated (an exited pod is counted in full meanwhile)."""
        with self.lock:
            return {pid: billed(Decimal(str(p["costPerHr"])), p["_created_at"], p["_terminated_at"])
                    for pid, p in self.pods.items()}

    def pod(self, pod_id: str) -> dict[str, Any] | None:
        with self.lock:
            pod = self.pods.get(pod_id)
            return self._render(pod) if pod is not None else None

    def set_cloud(self, gpu_id: str, cloud: str, *, price: str | None = None, spot: str | None = None,
                  stock: dict[int, str] | None = None) -> None:
        """Change one cloud's side of a GPU type: its on-demand or spot $/GPU-hour, or its stock by GPU count."""
        with self.lock:
            gpu = next(g for g in self.gpu_types if g["id"] == gpu_id)
            side = gpu["_clouds"][cloud]
            if price is not None:
                side["price"] = Decimal(price)
                gpu[f"{cloud.lower()}Price"] = money(price)
            if spot is not None:
                side["spot"] = Decimal(spot)
                gpu[f"{cloud.lower()}SpotPrice"] = money(spot)
            if stock is not None:
                side["stock"] = dict(stock)

    def terminated_by(self, pod_id: str) -> str | None:
        """Which key terminated the pod: "account", "scoped" (its own RUNPOD_API_KEY), or None while it lives."""
        with self.lock:
            return self.pods[pod_id]["_terminated_by"]  # type: ignore[no-any-return]

    def _key_owner(self, key: str) -> str | None:
        return next((pid for pid, pod in self.pods.items() if key and pod["_scoped_key"] == key), None)

    def interrupt(self, pod_id: str) -> None:
        """Reclaim a spot pod: it shows EXITED and its machine is gone."""
        with self.lock:
            pod = self.pods[pod_id]
            if pod["podType"] != "INTERRUPTABLE":
                raise ValueError(f"{pod_id} is not a spot pod")
            pod["desiredStatus"] = "EXITED"
            self.pod_machines[pod_id].destroy()

    # -- the API --------------------------------------------------------------------------------------------------

    def too_many(self) -> httpx.Response:
        after = self.switches.retry_after
        return json_response(429, {"errors": [{"message": "Too many requests"}]},
                             {"retry-after": f"{after:g}"} if after is not None else None)

    def dispatch(self, request: httpx.Request, body: Any) -> httpx.Response:
        if request.method != "POST" or request.url.path != "/graphql":
            return json_response(404, {"error": "not found"})
        # A pod's own RUNPOD_API_KEY ("Pod-scoped", RunPod's docs; its exact reach UNCONFIRMED, 2026-11-29): the
        # fake lets it stop or terminate its own pod and nothing else.
        scope = None if self.authorized(request) else self._key_owner(self.bearer(request))
        if not self.authorized(request) and scope is None:
            return json_response(401, {"error": "Unauthorized"})
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return json_response(400, {"errors": [{"message": "Must provide query string."}], "data": None})
        query, variables = body["query"], body.get("variables") or {}
        op = next((o for o in _OPS if re.search(rf"(?<![\w$]){o}\s*[({{]", query)), None)
        if op is None:
            return json_response(400, {"errors": [{"message": f"unknown operation: {query[:80]!r}"}], "data": None})
        tree = _selection(query, op)
        if scope is not None and (op not in ("podTerminate", "podStop")
                                  or _input(query, variables, op).get("podId") != scope):
            return json_response(403, {"errors": [{"message": "this key may only stop or terminate its own pod"}],
                                       "data": None})
        if op == "gpuTypes":
            wanted = _input(query, variables, "gpuTypes").get("id")
            asked = _input(query, variables, "lowestPrice")
            count, secure = int(asked.get("gpuCount") or 1), asked.get("secureCloud")
            gpus = [{**g, "lowestPrice": _lowest(g, count, secure)} for g in self.gpu_types
                    if wanted in (None, g["id"])]
            return _data(op, gpus, tree)
        if op == "myself":
            pods = [self._render(p) for p in self.pods.values() if p["desiredStatus"] != "TERMINATED"]
            return _data(op, {"pods": pods}, tree)
        pod_id = _input(query, variables, op).get("podId")
        if op == "pod":
            pod = self.pods.get(str(pod_id))
            alive = pod is not None and pod["desiredStatus"] != "TERMINATED"
            return _data(op, self._render(pod) if pod is not None and alive else None, tree)
        if op in ("podFindAndDeployOnDemand", "podRentInterruptable"):
            return self._create(op, _input(query, variables, op), tree)
        if op == "podTerminate" and self.switches.take("terminate_failures"):
            return httpx.Response(500, text="Internal Server Error")
        pod = self.pods.get(str(pod_id))
        if pod is None or pod["desiredStatus"] == "TERMINATED":
            return _error(f"Pod not found: {pod_id}")  # the real text is UNCONFIRMED
        if op == "podTerminate":
            pod["desiredStatus"], pod["_terminated_at"] = "TERMINATED", time.time()
            pod["_terminated_by"] = "account" if scope is None else "scoped"
            self.pod_machines[pod["id"]].destroy()
            return _data(op, None, None)  # a bare scalar: no selection set
        if op == "podStop":
            pod["desiredStatus"] = "EXITED"
            self.pod_machines[pod["id"]].destroy()
        elif pod["desiredStatus"] != "RUNNING":  # podResume
            self._boot(pod, fail=False, gpu=pod["_gpu"])
        return _data(op, self._render(pod), tree)

    def _create(self, op: str, inp: dict[str, Any], tree: dict[str, Any] | None) -> httpx.Response:
        gpu = next((g for g in self.gpu_types if g["id"] == inp.get("gpuTypeId")), None)
        if gpu is None:
            return _error(f"There are no GPU types matching {inp.get('gpuTypeId')!r}")
        cloud_type = inp.get("cloudType", "ALL")
        if cloud_type not in ("ALL", *CLOUDS):
            return _error(f'Variable "$input" got invalid value {cloud_type!r} at "input.cloudType"; '
                          'Value does not exist in "CloudTypeEnum" enum.')
        if not isinstance(inp.get("ports", ""), str):
            return _error('Variable "$input" got invalid value at "input.ports"; String cannot represent a list')
        count = int(inp.get("gpuCount") or 1)
        # ALL lets RunPod place the pod on either cloud. Where it does is UNCONFIRMED (2026-12-06); the fake puts it
        # on secure cloud when secure has stock, at secure's price, as issue 13 saw ($0.34 quoted, $0.69 billed).
        def in_stock(name: str) -> bool:
            return name in gpu["_clouds"] and _in_stock(gpu["_clouds"][name], count)

        cloud = next((c for c in CLOUDS if in_stock(c)), None) if cloud_type == "ALL" else cloud_type
        if cloud is not None and self.sold_out_on_create.get(cloud, 0) > 0:
            self.sold_out_on_create[cloud] -= 1
            gpu["_clouds"][cloud]["stock"] = dict.fromkeys(gpu["_clouds"][cloud]["stock"], "None")
        if (self.switches.take("take_offer_on_create") or self.switches.take("capacity_errors")
                or cloud is None or not in_stock(cloud)):
            return _error(CAPACITY_ERROR)
        side = gpu["_clouds"][cloud]
        spot = op == "podRentInterruptable"
        per_gpu = Decimal(str(inp.get("bidPerGpu"))) if spot else side["price"]
        if spot and per_gpu < side["spot"]:
            return _error(f"Your bid of ${per_gpu}/GPU is below the minimum bid of ${side['spot']}/GPU.")
        pod_id = "".join(self._rng.choices(string.ascii_lowercase + string.digits, k=14))
        env = [f"{e['key']}={e['value']}" for e in inp.get("env") or []]
        pod = {"id": pod_id, "name": inp.get("name") or "", "imageName": inp.get("imageName"), "env": env,
               "gpuCount": count, "podType": "INTERRUPTABLE" if spot else "RESERVED", "desiredStatus": "RUNNING",
               "costPerHr": per_gpu * count * self.bill_markup, "containerDiskInGb": inp.get("containerDiskInGb"),
               "volumeInGb": inp.get("volumeInGb"), "ports": inp.get("ports"), "machineId": f"m{pod_id[:11]}",
               "dockerArgs": inp.get("dockerArgs") or "",
               "machine": {"podHostId": f"{pod_id}-{self._rng.getrandbits(32):08x}",
                           "gpuDisplayName": gpu["displayName"]},
               "lastStatusChange": f"Rented by User: {time.ctime()}"}
        self.pods[pod_id] = pod
        pod["_gpu"], pod["_cloud"] = str(gpu["id"]), cloud
        # Community cloud gives a pod a public IP only when asked (2.1: direct SSH there needs supportPublicIp).
        pod["_public_ip"] = cloud == "SECURE" or inp.get("supportPublicIp") is True
        pod["_scoped_key"], pod["_terminated_by"] = scoped_key(), None  # its in-pod RUNPOD_API_KEY; who ended it
        pod["_created_at"], pod["_terminated_at"] = time.time(), None  # its bill (see bills())
        self._boot(pod, fail=self.switches.take("boot_fails"), gpu=pod["_gpu"])
        if self.switches.take("drop_create_reply"):
            raise DropReply
        return self.created(_data(op, self._render(pod), tree))

    def _boot(self, pod: dict[str, Any], *, fail: bool, gpu: str) -> None:
        # dockerArgs is the container's start command (the image's CMD otherwise), run in the pod's environment.
        machine = self.machines.create(boot_delay=self.switches.boot_delay, fail=fail, gpu=("runpod", gpu),
                                       count=int(pod["gpuCount"]),
                                       env={"RUNPOD_POD_ID": pod["id"], "RUNPOD_API_KEY": pod["_scoped_key"]},
                                       start=shlex.split(pod["dockerArgs"]) if pod.get("dockerArgs") else None)
        for item in pod["env"]:
            if item.startswith("PUBLIC_KEY="):
                machine.authorize(item.removeprefix("PUBLIC_KEY="))
        pod["desiredStatus"] = "RUNNING"
        pod["_exit_at"] = (time.time() + self.switches.boot_delay) if fail else None
        self.pod_machines[pod["id"]] = machine

    def _render(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The pod as the API shows it now: a failed boot exits; ``runtime`` appears once sshd answers."""
        if pod.get("_exit_at") is not None and time.time() >= pod["_exit_at"] and pod["desiredStatus"] == "RUNNING":
            pod["desiredStatus"] = "EXITED"
        machine = self.pod_machines[pod["id"]]
        runtime = None
        if pod["desiredStatus"] == "RUNNING" and machine.ready:
            runtime = {"uptimeInSeconds": int(time.time() - machine.created_at), "ports": [
                {"ip": machine.host, "isIpPublic": pod["_public_ip"], "privatePort": 22, "publicPort": machine.port,
                 "type": "tcp"}]}
        cost = pod["costPerHr"]
        shown = {k: v for k, v in pod.items() if not k.startswith("_")}
        return {**shown, "runtime": runtime, "costPerHr": str(cost) if self.cost_as_string else money(cost)}


def _error(message: str) -> httpx.Response:
    return json_response(200, {"errors": [{"message": message}], "data": None})


def _data(op: str, value: Any, tree: dict[str, Any] | None) -> httpx.Response:
    return json_response(200, {"data": {op: _project(value, tree)}})


def _project(value: Any, tree: dict[str, Any] | None) -> Any:
    """Keep only the selected fields, as a GraphQL server answers."""
    if tree is None or value is None:
        return value
    if isinstance(value, list):
        return [_project(v, tree) for v in value]
    return {key: _project(value.get(key), sub) for key, sub in tree.items()}


def _in_stock(side: dict[str, Any], count: int) -> bool:
    return side["stock"].get(count, "None") != "None"


def _lowest(gpu: dict[str, Any], count: int, secure: bool | None) -> dict[str, Any]:
    """``lowestPrice(input: {gpuCount, secureCloud})``: one cloud's on-demand and spot $/GPU-hour and stock for
    ``count`` GPUs. ``secureCloud: false`` reads as community cloud only and an absent one as either cloud (the
    cheaper in stock): neither is in the reference, which shows only ``secureCloud: true``; decided 2026-12-06."""
    clouds = gpu["_clouds"]
    names = list(clouds) if secure is None else [CLOUDS[0] if secure else CLOUDS[1]]
    sides = [clouds[n] for n in names if n in clouds and count in clouds[n]["stock"]]
    if secure is None:
        sides = sorted(sides, key=lambda side: (not _in_stock(side, count), side["price"]))[:1]
    if not sides:
        return {"uninterruptablePrice": None, "minimumBidPrice": None, "stockStatus": None}
    (side,) = sides
    return {"uninterruptablePrice": money(side["price"]), "minimumBidPrice": money(side["spot"]),
            "stockStatus": side["stock"][count]}


def _literal(token: str, variables: dict[str, Any]) -> Any:
    if token.startswith("$"):
        return variables.get(token[1:])
    try:
        return json.loads(token)  # a string, number, true, false or null
    except ValueError:
        return token  # an enum value such as ALL


def _input(query: str, variables: dict[str, Any], field: str) -> dict[str, Any]:
    """``field(input: $var)`` from the variables, or ``field(input: {k: literal, env: [{key, value}]})``."""
    start = query.find("{")
    m = re.compile(rf"(?<![\w$]){field}\s*\(\s*input\s*:\s*(\$\w+|\{{)").search(query, start)
    if m is None:
        return {}
    if m.group(1) != "{":
        return dict(variables.get(m.group(1)[1:]) or {})
    depth, end = 0, m.end() - 1
    for end in range(m.end() - 1, len(query)):
        depth += {"{": 1, "}": -1}.get(query[end], 0)
        if depth == 0:
            break
    block, out = query[m.end():end], {}
    env = re.search(r"\benv\s*:\s*\[(.*?)\]", block, re.S)
    if env is not None:
        out["env"] = [{"key": _literal(k, variables), "value": _literal(v, variables)}
                      for k, v in re.findall(rf"key\s*:\s*({_TOKEN})\s*,\s*value\s*:\s*({_TOKEN})", env.group(1))]
        block = block[:env.start()] + block[env.end():]
    for key, token in re.findall(rf"(?<![\w$])(\w+)\s*:\s*({_TOKEN})", block):
        out[key] = _literal(token, variables)
    return out


def _selection(query: str, field: str) -> dict[str, Any] | None:
    """The selection set of the first ``field`` inside the operation, as nested dicts (None: a scalar)."""
    m = re.compile(rf"(?<![\w$]){field}\b").search(query, query.find("{"))
    if m is None:
        return None
    i = _skip_args(query, m.end())
    return _parse_set(query, i)[0] if i < len(query) and query[i] == "{" else None


def _skip_args(text: str, i: int) -> int:
    """Past the whitespace and any ``(arguments)`` after a field name."""
    i = len(text) - len(text[i:].lstrip())
    if i < len(text) and text[i] == "(":
        depth, quoted = 0, False
        while i < len(text):
            c = text[i]
            quoted = quoted != (c == '"' and text[i - 1] != "\\")
            depth += 0 if quoted else {"(": 1, ")": -1}.get(c, 0)
            i += 1
            if depth == 0:
                break
    return len(text) - len(text[i:].lstrip())


def _parse_set(text: str, i: int) -> tuple[dict[str, Any], int]:
    tree: dict[str, Any] = {}
    i, last = i + 1, ""
    while i < len(text):
        name = re.compile(r"\w+").match(text, i)
        if name is not None:
            last, i = name.group(), _skip_args(text, name.end())
            tree[last] = None
        elif text[i] == "{" and last:
            tree[last], i = _parse_set(text, i)
        elif text[i] == "}":
            return tree, i + 1
        else:
            i += 1
    return tree, i
