"""VastProvider against FakeVast (tests/fakes/vast.py): search, rent, look up, list, destroy, and one real SSH login.

Unit tests run on an httpx MockTransport; instances boot a real sshd only in the tests marked ``ssh`` (the others
set a long boot delay, so their machines never start before the fake is closed).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import subprocess
import time
from collections.abc import Coroutine, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from burst_checks import protocol_gaps
from fakes.vast import FakeVast
from sshd import make_key

from burst_jupyter.errors import AuthFailed, OfferGone, ProvisioningFailed
from burst_jupyter.providers._http import RetryPolicy
from burst_jupyter.providers.base import REMOTE_JOB_ROOT, Instance, InstanceState, Offer, OfferQuery, Provider
from burst_jupyter.providers.vast import VastProvider
from burst_jupyter.spec import JobSpec

T = TypeVar("T")
TAG = "burst-0a1b2c"
SPEC = JobSpec(cell="print(1)")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeVast]:
    cloud = FakeVast(tmp_path)
    cloud.switches.boot_delay = 60.0  # no sshd unless a test asks for one
    yield cloud
    cloud.close()


def provider(fake: FakeVast, **kw: Any) -> VastProvider:
    return VastProvider(api_key=kw.pop("api_key", "test-key"), client=fake.client(),
                        retry=RetryPolicy(base_seconds=0.01, max_sleep_seconds=0.02), ssh_user=getpass.getuser(),
                        poll_seconds=0.05, **kw)


@pytest.fixture
def vast(fake: FakeVast) -> Iterator[VastProvider]:
    p = provider(fake)
    yield p
    run(p.aclose())


def searches(fake: FakeVast) -> list[dict[str, Any]]:
    return [r.body for r in fake.requests if r.path == "/api/v0/bundles/"]


async def first_offer(vast: VastProvider, **query: Any) -> Offer:
    return (await vast.offers(OfferQuery(gpu_model="RTX_4090", **query)))[0]


async def launch(vast: VastProvider, offer: Offer | None = None, key: str | None = None, job: str = "j1") -> Instance:
    offer = offer or await first_offer(vast)
    return await vast.launch(offer, SPEC, job_id=job, tag=TAG, ssh_public_key=key)


async def wait_for(vast: VastProvider, instance_id: str, state: InstanceState, timeout: float = 15.0) -> Instance:
    deadline = time.monotonic() + timeout
    while True:
        got = await vast.get(instance_id)
        assert got is not None
        if got.state is state or time.monotonic() > deadline:
            return got
        await asyncio.sleep(vast.poll_seconds)


def test_is_a_provider(vast: VastProvider) -> None:
    assert protocol_gaps(vast, Provider) == []


# -- offers ----------------------------------------------------------------------------------------------------


def test_search_sends_vast_spellings_and_units_and_returns_canonical_decimals(fake: FakeVast, vast: VastProvider):
    offers = run(vast.offers(OfferQuery(gpu_model="RTX_4090", memory_gb=24)))
    body = searches(fake)[-1]
    assert body["gpu_name"] == {"in": ["RTX 4090"]}  # spaces, not RTX_4090
    assert body["gpu_ram"] == {"gte": 24000}  # MB
    assert body["num_gpus"] == {"eq": 1} and body["type"] == "on-demand"
    assert body["order"] == [["dph_total", "asc"]] and body["allocated_storage"] == 20.0
    assert body["direct_port_count"] == {"gte": 1} and body["rentable"] == {"eq": True}
    assert body["verified"] == {"eq": True} and body["rented"] == {"eq": False}
    assert [o.offer_id for o in offers] == ["4102", "4101"]  # 4103 has 2 GPUs, 4104 no direct port
    assert [o.price_usd_per_hour for o in offers] == [Decimal("0.298"), Decimal("0.352")]
    assert all(o.gpu_model == "RTX_4090" and o.memory_gb == 24 and o.provider == "vast" for o in offers)
    assert offers[0].location == "Quebec, CA" and offers[0].reliability == pytest.approx(0.9412)


def test_search_any_gpu_maps_names_drops_unknown_and_sorts(fake: FakeVast, vast: VastProvider):
    fake.add_offer(gpu_name="GTX 1080", gpu_ram=8192, dph_total=0.05)  # not in the catalog
    offers = run(vast.offers(OfferQuery(gpu_model="ANY")))
    models = [o.gpu_model for o in offers]
    assert "RTX 4090" in searches(fake)[-1]["gpu_name"]["in"]
    assert {"RTX_3090", "RTX_4090", "H100", "A100_80GB", "A100_40GB"} == set(models)
    assert models[0] == "RTX_3090" and models[-1] == "H100"
    prices = [o.price_usd_per_hour for o in offers]
    assert prices == sorted(prices) and all(isinstance(p, Decimal) for p in prices)
    a100 = {o.offer_id: o.gpu_model for o in offers if o.gpu_model and o.gpu_model.startswith("A100")}
    assert a100 == {"8101": "A100_80GB", "8102": "A100_40GB"}  # one spelling, told apart by gpu_ram


def test_search_honours_max_price_and_min_reliability(fake: FakeVast, vast: VastProvider):
    offers = run(vast.offers(OfferQuery(gpu_model="RTX_4090", max_price_usd_per_hour=Decimal("0.34"),
                                        min_reliability=0.95, direct_ssh=False)))
    body = searches(fake)[-1]
    assert body["dph_total"] == {"lte": 0.34} and body["reliability"] == {"gte": 0.95}
    assert "direct_port_count" not in body
    assert [o.offer_id for o in offers] == ["4104"]  # 4102 unreliable, 4101 too dear; 4104 has no direct port


def test_search_spot_prices_at_min_bid(fake: FakeVast, vast: VastProvider):
    offers = run(vast.offers(OfferQuery(gpu_model="RTX_4090", spot=True, max_price_usd_per_hour=Decimal("0.19"))))
    assert searches(fake)[-1]["type"] == "bid"
    assert "dph_total" not in searches(fake)[-1]  # the ceiling applies to min_bid, on our side
    assert [(o.offer_id, o.price_usd_per_hour, o.spot) for o in offers] == [("4102", Decimal("0.15"), True)]


def test_rented_offer_leaves_the_search(fake: FakeVast, vast: VastProvider):
    run(launch(vast))
    assert [o.offer_id for o in run(vast.offers(OfferQuery(gpu_model="RTX_4090")))] == ["4101"]


# -- launch ----------------------------------------------------------------------------------------------------


def test_launch_body_labels_and_env_and_never_the_api_key(tmp_path: Path):
    secret = "vast-SECRET-key-5f2e"
    fake = FakeVast(tmp_path, api_key=secret)
    fake.switches.boot_delay = 60.0
    vast = provider(fake, api_key=secret)
    try:
        key = make_key(tmp_path / "id")
        inst = run(launch(vast, key=key, job="job-42"))
        create = next(r for r in fake.requests if r.method == "PUT" and r.path == "/api/v0/asks/4102/")
        body = create.body
        assert body["client_id"] == "me" and body["label"] == TAG and body["disk"] == 20
        assert body["env"] == {"-p 22:22": "1", "BURST_OWNER": TAG, "BURST_JOB_ID": "job-42"}
        assert body["runtype"] == "ssh_direc ssh_proxy" and body["cancel_unavail"] is True
        assert "price" not in body and body["image"]
        attach = next(r for r in fake.requests if r.path == f"/api/v0/instances/{inst.instance_id}/ssh/")
        assert attach.method == "POST" and attach.body == {"ssh_key": key}
        assert fake.instance(inst.instance_id).machine.authorized == [key]
        for r in fake.requests:  # the key only ever travels in the Authorization header
            assert secret not in json.dumps(r.body) and secret not in r.path
            assert r.headers["authorization"] == f"Bearer {secret}"
        assert all(secret not in json.dumps(q) for _, _, q in fake.queries)
        assert secret not in json.dumps(fake.instance(inst.instance_id).row)
        assert inst.state is InstanceState.PENDING and inst.endpoint is None
        assert inst.workdir == f"{REMOTE_JOB_ROOT}/job-42" and inst.price_usd_per_hour == Decimal("0.298")
        assert (inst.tag, inst.job_id, inst.spot, inst.gpu_model) == (TAG, "job-42", False, "RTX_4090")
    finally:
        run(vast.aclose())
        fake.close()


def test_launch_spot_bids_the_offer_price(fake: FakeVast, vast: VastProvider):
    offer = run(first_offer(vast, spot=True))
    inst = run(launch(vast, offer))
    create = next(r for r in fake.requests if r.method == "PUT")
    assert create.body["price"] == 0.15 and inst.spot
    got = run(vast.get(inst.instance_id))
    assert got is not None and got.spot and got.price_usd_per_hour == Decimal("0.15")


def test_taken_offer_raises_offer_gone(fake: FakeVast, vast: VastProvider):
    offer = run(first_offer(vast))
    fake.switches.take_offer_on_create = 1
    with pytest.raises(OfferGone, match="taken"):
        run(launch(vast, offer))
    with pytest.raises(OfferGone):  # and it stays taken
        run(launch(vast, offer, job="j2"))
    assert fake.running() == []


def test_key_that_cannot_be_attached_destroys_the_instance(fake: FakeVast, vast: VastProvider):
    with pytest.raises(ProvisioningFailed, match="destroyed"):
        run(launch(vast, key="not a key"))
    assert fake.running() == [] and len(fake.instances) == 1


def test_lost_create_reply_finds_the_instance_by_tag(fake: FakeVast, vast: VastProvider):
    fake.switches.drop_create_reply = 1
    inst = run(launch(vast, job="lost-1"))
    assert [i.row["id"] for i in fake.running()] == [int(inst.instance_id)]  # one instance, not two
    assert sum(r.method == "PUT" for r in fake.requests) == 1  # the create was not sent again


def test_bad_key_is_auth_failed(fake: FakeVast):
    vast = provider(fake, api_key="wrong")
    with pytest.raises(AuthFailed, match="Invalid user key"):
        run(vast.offers(OfferQuery(gpu_model="RTX_4090")))
    run(vast.aclose())


def test_plain_text_429_without_retry_after_is_retried(fake: FakeVast, vast: VastProvider):
    answer = fake.too_many()
    assert answer.text == "API requests too frequent" and "retry-after" not in answer.headers
    fake.switches.rate_limit_next = 2
    assert run(vast.offers(OfferQuery(gpu_model="RTX_4090")))
    assert len(searches(fake)) == 3


# -- look-ups ------------------------------------------------------------------------------------------------------


def test_list_owned_follows_pages_and_filters_by_label(fake: FakeVast, vast: VastProvider):
    mine = {fake.add_instance(label=TAG, extra_env=[["BURST_JOB_ID", f"j{n}"]]).row["id"] for n in range(30)}
    for _ in range(4):
        fake.add_instance(label="someone-else")
    found = run(vast.list_owned(TAG))
    assert {int(i.instance_id) for i in found} == mine and len(found) == 30
    assert {i.tag for i in found} == {TAG} and {i.job_id for i in found} == {f"j{n}" for n in range(30)}
    pages = [q for m, p, q in fake.queries if p == "/api/v1/instances/"]
    assert len(pages) == 2 and "after_token" not in pages[0] and pages[1]["after_token"]
    assert all(json.loads(q["select_filters"]) == {"label": {"eq": TAG}} and q["limit"] == "25" for q in pages)
    assert run(vast.list_owned("nobody")) == []


def test_get_maps_rows_and_gone_is_none(fake: FakeVast, vast: VastProvider):
    assert run(vast.get("999999")) is None
    proxied = fake.add_instance(label=TAG, ssh_host="ssh5.vast.ai", ssh_port=31022, ports={},
                                image_runtype="ssh_proxy", start_date=1_700_000_000.0)
    got = run(vast.get(str(proxied.row["id"])))
    assert got is not None and got.state is InstanceState.RUNNING
    assert (got.endpoint.host, got.endpoint.port, got.endpoint.user) == ("ssh5.vast.ai", 31022, getpass.getuser())
    assert got.created_at.year == 2023 and got.tag == TAG and got.gpu_model == "RTX_4090"
    direct = fake.add_instance(public_ipaddr="203.0.113.7\n", ssh_host="ssh5.vast.ai", ssh_port=31022,
                               ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40022"}]})
    got = run(vast.get(str(direct.row["id"])))
    assert got is not None and (got.endpoint.host, got.endpoint.port) == ("203.0.113.7", 40022)
    assert any(q == {"owner": "me"} for m, p, q in fake.queries if p.startswith("/api/v0/instances/"))
    run(vast.terminate(str(direct.row["id"])))
    assert run(vast.get(str(direct.row["id"]))) is None


def test_failed_boot_is_failed_and_outbid_is_stopped(fake: FakeVast, vast: VastProvider):
    fake.switches.boot_delay, fake.switches.boot_fails = 0.0, 1
    failed = run(launch(vast))
    got = run(vast.get(failed.instance_id))
    assert got is not None and got.state is InstanceState.FAILED and got.detail
    fake.switches.boot_delay = 60.0
    spot = run(launch(vast, run(first_offer(vast, spot=True)), job="j2"))
    fake.outbid(spot.instance_id)
    got = run(vast.get(spot.instance_id))
    assert got is not None and got.state is InstanceState.STOPPED and got.detail == "outbid/paused"
    assert got.endpoint is None


def test_billed_rate_is_read_from_dph_total(fake: FakeVast, vast: VastProvider):
    fake.bill_markup = Decimal("1.5")
    inst = run(launch(vast))
    assert inst.price_usd_per_hour == Decimal("0.298")  # what the offer said
    got = run(vast.get(inst.instance_id))
    assert got is not None and got.price_usd_per_hour == Decimal("0.447")  # what Vast bills


# -- terminate -------------------------------------------------------------------------------------------------------


def test_terminate_is_idempotent(fake: FakeVast, vast: VastProvider):
    inst = run(launch(vast))
    run(vast.terminate(inst.instance_id))
    run(vast.terminate(inst.instance_id))
    run(vast.terminate("424242"))
    assert fake.running() == [] and run(vast.get(inst.instance_id)) is None


def test_terminate_retries_server_errors(fake: FakeVast, vast: VastProvider):
    inst = run(launch(vast))
    fake.switches.terminate_failures = 2
    run(vast.terminate(inst.instance_id))
    assert sum(r.method == "DELETE" for r in fake.requests) == 3 and fake.running() == []


# -- real machines -----------------------------------------------------------------------------------------------------


@pytest.mark.ssh
def test_pending_then_running_and_the_attached_key_logs_in(fake: FakeVast, vast: VastProvider, tmp_path: Path):
    fake.switches.boot_delay = 0.3
    key = make_key(tmp_path / "job_key")
    inst = run(launch(vast, key=key))
    first = run(vast.get(inst.instance_id))
    assert first is not None and first.state is InstanceState.PENDING and first.endpoint is None
    assert fake.instance(inst.instance_id).row["actual_status"] in (None, "loading")
    up = run(wait_for(vast, inst.instance_id, InstanceState.RUNNING))
    assert up.state is InstanceState.RUNNING and up.endpoint is not None
    machine = fake.instance(inst.instance_id).machine
    assert (up.endpoint.host, up.endpoint.port, up.endpoint.user) == ("127.0.0.1", machine.port, machine.user)
    assert isinstance(fake.instance(inst.instance_id).row["ports"]["22/tcp"][0]["HostPort"], str)
    login = subprocess.run(
        ["ssh", "-F", "none", "-i", str(tmp_path / "job_key"), "-p", str(up.endpoint.port),
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", f"{up.endpoint.user}@{up.endpoint.host}", "true"],
        capture_output=True, text=True, timeout=20)
    assert login.returncode == 0, login.stderr
    run(vast.terminate(inst.instance_id))
    assert machine.processes() == [] and fake.running() == []
    assert run(vast.get(inst.instance_id)) is None
