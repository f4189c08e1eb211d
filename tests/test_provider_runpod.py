"""RunPodProvider against FakeRunPod (tests/fakes/runpod.py): offers, launch, look-up, ownership, teardown, faults.

Machines boot a real sshd only in the tests marked ``ssh``; elsewhere the fake's boot delay keeps them from ever
booting, so the rest run in milliseconds.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fakes.runpod import CAPACITY_ERROR, FakeRunPod
from sshd import make_key

from burst_jupyter.errors import AuthFailed, OfferGone, ProviderError, RateLimited
from burst_jupyter.providers._http import RetryPolicy
from burst_jupyter.providers.base import REMOTE_JOB_ROOT, Instance, InstanceState, Offer, OfferQuery
from burst_jupyter.providers.runpod import RunPodProvider
from burst_jupyter.spec import JobSpec

T = TypeVar("T")
SPEC = JobSpec(cell="pass")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummyKeyForTestsOnly"
NEVER = 3600.0  # a boot delay no test waits out: the machine never starts an sshd


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeRunPod]:
    cloud = FakeRunPod(tmp_path)
    cloud.switches.boot_delay = NEVER
    yield cloud
    cloud.close()


def run(fake: FakeRunPod, body: Callable[[RunPodProvider], Awaitable[T]], *, api_key: str = "test-key",
        **kwargs: Any) -> T:
    async def main() -> T:
        provider = RunPodProvider(api_key=api_key, client=fake.client(),
                                  retry=RetryPolicy(base_seconds=0.01, max_sleep_seconds=0.02),
                                  ssh_user=getpass.getuser(), poll_seconds=0.05, **kwargs)
        try:
            return await body(provider)
        finally:
            await provider.aclose()

    return asyncio.run(main())


async def launch_one(p: RunPodProvider, *, gpu: str = "RTX_4090", spot: bool = False, job_id: str = "j1",
                     tag: str = "burst-abc", key: str | None = KEY) -> Instance:
    offer = next(o for o in await p.offers(OfferQuery(gpu_model=gpu, spot=spot)))
    return await p.launch(offer, SPEC, job_id=job_id, tag=tag, ssh_public_key=key)


def creates(fake: FakeRunPod) -> list[dict[str, Any]]:
    return [r.body for r in fake.requests if "podFindAndDeployOnDemand" in r.body["query"]
            or "podRentInterruptable" in r.body["query"]]


# -- offers ----------------------------------------------------------------------------------------------------


def test_offers_are_per_cloud_with_canonical_names_and_decimal_prices_cheapest_first(fake: FakeRunPod) -> None:
    offers = run(fake, lambda p: p.offers(OfferQuery(gpu_model="ANY")))
    assert [(o.gpu_model, o.tier, o.price_usd_per_hour) for o in offers] == [  # MI300X is not in our catalog
        ("RTX_3090", "community", Decimal("0.22")), ("RTX_4090", "community", Decimal("0.34")),
        ("RTX_3090", "secure", Decimal("0.43")), ("RTX_4090", "secure", Decimal("0.69")),
        ("A100_80GB", "community", Decimal("1.74")), ("A100_80GB", "secure", Decimal("1.89")),
        ("H100", "community", Decimal("2.69")), ("H100", "secure", Decimal("2.99"))]
    rtx = offers[1]
    assert isinstance(rtx.price_usd_per_hour, Decimal)
    assert (rtx.provider, rtx.offer_id, rtx.gpus, rtx.memory_gb, rtx.spot) == (
        "runpod", "NVIDIA GeForce RTX 4090@community", 1, 24, False)
    assert rtx.ref == "runpod:NVIDIA_GeForce_RTX_4090@community" and "community cloud" in rtx.description
    assert offers[-1].reliability < rtx.reliability  # H100 stock is Low
    # One gpuTypes query per cloud, each priced for that cloud alone.
    assert sorted(r.body["variables"]["secureCloud"] for r in fake.requests) == [False, True]


def test_offer_price_is_per_gpu_times_gpus_and_no_stock_means_no_offer(fake: FakeRunPod) -> None:
    offers = run(fake, lambda p: p.offers(OfferQuery(gpu_model=None, gpus=4)))
    # RTX 3090 has stock "None" at 4 GPUs on community and no 4-GPU price on secure; nor have the A100 and H100.
    assert [(o.gpu_model, o.tier, o.gpus, o.price_usd_per_hour) for o in offers] == [
        ("RTX_4090", "community", 4, Decimal("1.36")), ("RTX_4090", "secure", 4, Decimal("2.76"))]
    assert {r.body["variables"]["gpuCount"] for r in fake.requests} == {4}


def test_spot_offers_are_priced_at_each_clouds_minimum_bid(fake: FakeRunPod) -> None:
    offers = run(fake, lambda p: p.offers(OfferQuery(gpu_model="RTX_4090", gpus=2, spot=True)))
    assert [(o.spot, o.tier, o.price_usd_per_hour, o.extra["bid_per_gpu"]) for o in offers] == [
        (True, "community", Decimal("0.58"), "0.29"), (True, "secure", Decimal("0.88"), "0.44")]


def test_a_cloud_a_type_is_not_sold_on_has_no_offer(fake: FakeRunPod) -> None:
    fake.gpu_types[0]["communityCloud"] = False  # the RTX 4090: secure cloud only
    offers = run(fake, lambda p: p.offers(OfferQuery(gpu_model="RTX_4090")))
    assert [o.offer_id for o in offers] == ["NVIDIA GeForce RTX 4090@secure"]


def test_filters_price_memory_model_and_reliability(fake: FakeRunPod) -> None:
    def prices(**query: Any) -> list[tuple[str | None, str, Decimal]]:
        return [(o.gpu_model, o.tier, o.price_usd_per_hour)
                for o in run(fake, lambda p: p.offers(OfferQuery(**query)))]

    assert prices(gpu_model="H100", max_price_usd_per_hour=Decimal("2.5")) == []
    assert prices(gpu_model="H100", max_price_usd_per_hour=Decimal("2.69")) == [("H100", "community", Decimal("2.69"))]
    assert prices(memory_gb=48) == [("A100_80GB", "community", Decimal("1.74")),
                                    ("A100_80GB", "secure", Decimal("1.89")),
                                    ("H100", "community", Decimal("2.69")), ("H100", "secure", Decimal("2.99"))]
    # Community's A100 and both H100s have Low stock.
    assert prices(memory_gb=48, min_reliability=0.95) == [("A100_80GB", "secure", Decimal("1.89"))]


# -- launch ------------------------------------------------------------------------------------------------------


def test_launch_names_and_tags_the_pod_and_sends_the_key_as_env_only(fake: FakeRunPod) -> None:
    inst = run(fake, launch_one)
    (body,) = creates(fake)
    pod_input = body["variables"]["input"]
    assert pod_input["name"] == "burst-abc-j1"
    assert pod_input["env"] == [{"key": "PUBLIC_KEY", "value": KEY}, {"key": "BURST_OWNER", "value": "burst-abc"},
                                {"key": "BURST_JOB_ID", "value": "j1"}]
    assert (pod_input["gpuTypeId"], pod_input["gpuCount"], pod_input["cloudType"]) == (
        "NVIDIA GeForce RTX 4090", 1, "COMMUNITY")  # the cheapest offer's cloud, never ALL
    assert (pod_input["ports"], pod_input["supportPublicIp"], pod_input["startSsh"]) == ("22/tcp", True, True)
    assert pod_input["imageName"].startswith("runpod/") and pod_input["volumeInGb"] == 0
    # The key travels in the Authorization header and nowhere else.
    assert all("test-key" not in json.dumps(r.body) and r.path == "/graphql" for r in fake.requests)
    assert all(r.headers["authorization"] == "Bearer test-key" for r in fake.requests)
    assert (inst.state, inst.endpoint, inst.job_id, inst.tag, inst.spot) == (
        InstanceState.PENDING, None, "j1", "burst-abc", False)
    assert inst.workdir == f"{REMOTE_JOB_ROOT}/j1" and inst.price_usd_per_hour == Decimal("0.34")
    assert [p["id"] for p in fake.running()] == [inst.instance_id]


@pytest.mark.parametrize("spot", [False, True])
def test_a_pod_is_created_on_the_chosen_offers_cloud_at_its_price(fake: FakeRunPod, spot: bool) -> None:
    async def body(p: RunPodProvider) -> list[tuple[Offer, Instance]]:
        offers = await p.offers(OfferQuery(gpu_model="RTX_4090", gpus=2, spot=spot))
        return [(o, await p.launch(o, SPEC, job_id=f"j{i}", tag="t", ssh_public_key=KEY))
                for i, o in enumerate(offers)]

    rented = run(fake, body)
    assert [o.tier for o, _ in rented] == ["community", "secure"]
    for (offer, inst), create in zip(rented, creates(fake), strict=True):
        assert create["variables"]["input"]["cloudType"] == offer.tier.upper()
        assert fake.pods[inst.instance_id]["_cloud"] == offer.tier.upper()  # where the fake placed it
        assert inst.price_usd_per_hour == offer.price_usd_per_hour  # billed (costPerHr) as quoted
    assert [i.price_usd_per_hour for _, i in rented] == (
        [Decimal("0.58"), Decimal("0.88")] if spot else [Decimal("0.68"), Decimal("1.38")])


def test_cloud_type_all_may_bill_the_other_clouds_price(fake: FakeRunPod) -> None:
    """What issue 13 saw, kept in the fake: ALL quoted at community's price lands on secure at secure's."""
    async def body(p: RunPodProvider) -> Any:
        return await p._graphql("create", 'mutation { podFindAndDeployOnDemand(input: {cloudType: ALL, gpuCount: 1, '
                                'gpuTypeId: "NVIDIA GeForce RTX 4090", name: "x"}) { id costPerHr } }',
                                {}, idempotent=False)

    assert run(fake, body)["podFindAndDeployOnDemand"]["costPerHr"] == 0.69


def test_spot_launch_rents_interruptible_at_the_bid(fake: FakeRunPod) -> None:
    async def body(p: RunPodProvider) -> tuple[Instance, Instance | None]:
        inst = await launch_one(p, spot=True, job_id="s1")
        fake.interrupt(inst.instance_id)
        return inst, await p.get(inst.instance_id)

    inst, after = run(fake, body)
    (create,) = creates(fake)
    assert "podRentInterruptable" in create["query"] and create["variables"]["input"]["bidPerGpu"] == 0.29
    assert inst.spot and inst.price_usd_per_hour == Decimal("0.29")
    assert after is not None and after.state is InstanceState.STOPPED and after.spot
    assert "interrupted" in after.detail


def test_image_from_the_spec_wins(fake: FakeRunPod) -> None:
    async def body(p: RunPodProvider) -> Instance:
        offer = (await p.offers(OfferQuery(gpu_model="RTX_4090")))[0]
        return await p.launch(offer, JobSpec(cell="pass", image="me/img:1"), job_id="j", tag="t", ssh_public_key=None)

    run(fake, body)
    pod_input = creates(fake)[0]["variables"]["input"]
    assert pod_input["imageName"] == "me/img:1" and all(e["key"] != "PUBLIC_KEY" for e in pod_input["env"])


def test_capacity_error_in_a_200_body_is_offer_gone(fake: FakeRunPod) -> None:
    fake.switches.take_offer_on_create = 1
    with pytest.raises(OfferGone) as err:
        run(fake, launch_one)
    assert "RTX_4090" in str(err.value) and "no longer any instances" in str(err.value)
    assert "\n" not in str(err.value) and fake.running() == []
    run(fake, launch_one)  # the next create goes through
    assert len(fake.running()) == 1


def test_capacity_switch_and_no_stock_at_create(fake: FakeRunPod) -> None:
    fake.switches.capacity_errors = 1
    with pytest.raises(OfferGone):
        run(fake, launch_one)
    stale = Offer(provider="runpod", offer_id="NVIDIA GeForce RTX 3090@community", gpu_model="RTX_3090", gpus=4,
                  price_usd_per_hour=Decimal("0.88"))
    with pytest.raises(OfferGone, match="RTX_3090 x4 left on community cloud"):
        run(fake, lambda p: p.launch(stale, SPEC, job_id="j", tag="t", ssh_public_key=KEY))


def test_capacity_gone_on_one_cloud_leaves_the_other(fake: FakeRunPod) -> None:
    """Stock that moved between search and create: community's last 4090s went, secure still has them."""
    fake.sold_out_on_create = {"COMMUNITY": 1}

    async def body(p: RunPodProvider) -> tuple[list[Offer], Instance]:
        community, secure = await p.offers(OfferQuery(gpu_model="RTX_4090"))
        with pytest.raises(OfferGone, match="left on community cloud"):
            await p.launch(community, SPEC, job_id="j1", tag="t", ssh_public_key=KEY)
        again = await p.offers(OfferQuery(gpu_model="RTX_4090"))
        return again, await p.launch(secure, SPEC, job_id="j2", tag="t", ssh_public_key=KEY)

    again, inst = run(fake, body)
    assert [o.tier for o in again] == ["secure"]  # the search no longer offers what is gone
    assert inst.price_usd_per_hour == Decimal("0.69") and [p["_cloud"] for p in fake.pods.values()] == ["SECURE"]


def test_an_offer_id_without_a_cloud_is_refused_before_any_create(fake: FakeRunPod) -> None:
    old = Offer(provider="runpod", offer_id="NVIDIA GeForce RTX 4090", gpu_model="RTX_4090", gpus=1,
                price_usd_per_hour=Decimal("0.34"))
    with pytest.raises(ProviderError, match="names no cloud"):
        run(fake, lambda p: p.launch(old, SPEC, job_id="j", tag="t", ssh_public_key=KEY))
    assert creates(fake) == []


def test_other_graphql_errors_carry_runpods_message(fake: FakeRunPod) -> None:
    bogus = Offer(provider="runpod", offer_id="NVIDIA Imaginary 9000@secure", gpu_model=None, gpus=1,
                  price_usd_per_hour=Decimal(1))
    with pytest.raises(ProviderError) as err:
        run(fake, lambda p: p.launch(bogus, SPEC, job_id="j", tag="t", ssh_public_key=KEY))
    assert not isinstance(err.value, OfferGone)
    assert "no GPU types matching" in str(err.value) and "podFindAndDeployOnDemand" in str(err.value)


def test_bad_key_is_auth_failed_without_the_key(fake: FakeRunPod) -> None:
    with pytest.raises(AuthFailed) as err:
        run(fake, lambda p: p.offers(OfferQuery()), api_key="wrong-secret")
    assert "wrong-secret" not in str(err.value)
    assert len(fake.requests) == 2  # one query per cloud, neither retried


@pytest.mark.parametrize("retry_after", [0.01, None])
def test_429_is_retried_then_succeeds(fake: FakeRunPod, retry_after: float | None) -> None:
    fake.switches.rate_limit_next, fake.switches.retry_after = 2, retry_after
    offers = run(fake, lambda p: p.offers(OfferQuery(gpu_model="RTX_4090")))
    assert len(offers) == 2 and len(fake.requests) == 4  # two 429s, then one query per cloud


def test_429_past_the_budget_is_rate_limited(fake: FakeRunPod) -> None:
    fake.switches.rate_limit_next = 100
    with pytest.raises(RateLimited, match="Too many requests"):
        run(fake, lambda p: p.offers(OfferQuery()))


def test_lost_create_reply_is_not_retried_and_the_pod_is_found_by_tag(fake: FakeRunPod) -> None:
    fake.switches.drop_create_reply = 1
    found = run(fake, launch_one)  # the pod RunPod made anyway, named by tag and job id: the job goes on with it
    assert len(creates(fake)) == 1
    assert found.job_id == "j1" and found.tag == "burst-abc"
    assert [p.instance_id for p in run(fake, lambda p: p.list_owned("burst-abc"))] == [found.instance_id]


def test_create_after_a_503_is_not_retried(fake: FakeRunPod) -> None:
    async def body(p: RunPodProvider) -> None:
        offer = (await p.offers(OfferQuery(gpu_model="RTX_4090")))[0]
        fake.switches.server_errors_next = 1
        await p.launch(offer, SPEC, job_id="j", tag="t", ssh_public_key=KEY)

    with pytest.raises(ProviderError, match="503"):
        run(fake, body)
    assert len(creates(fake)) == 1


# -- get, list_owned, terminate ----------------------------------------------------------------------------------


def test_get_is_pending_while_the_runtime_is_null(fake: FakeRunPod) -> None:
    async def body(p: RunPodProvider) -> Instance | None:
        return await p.get((await launch_one(p)).instance_id)

    inst = run(fake, body)
    assert inst is not None and inst.state is InstanceState.PENDING and inst.endpoint is None
    assert inst.detail == "starting the container" and (inst.job_id, inst.tag) == ("j1", "burst-abc")


def test_get_reads_the_billed_rate_even_as_a_string(fake: FakeRunPod) -> None:
    fake.cost_as_string, fake.bill_markup = True, Decimal("1.5")

    async def body(p: RunPodProvider) -> tuple[Instance, Instance | None]:
        inst = await launch_one(p)
        return inst, await p.get(inst.instance_id)

    launched, inst = run(fake, body)
    pod = fake.pod(launched.instance_id)
    assert pod is not None and pod["costPerHr"] == "0.510"
    assert launched.price_usd_per_hour == Decimal("0.51")  # costPerHr of the create answer, not the quote
    assert inst is not None and inst.price_usd_per_hour == Decimal("0.51")


def test_a_pod_that_fails_to_boot_shows_stopped(fake: FakeRunPod) -> None:
    fake.switches.boot_fails, fake.switches.boot_delay = 1, 0.0

    async def body(p: RunPodProvider) -> Instance | None:
        return await p.get((await launch_one(p)).instance_id)

    inst = run(fake, body)
    assert inst is not None and inst.state is InstanceState.STOPPED and inst.detail == "exited"


def test_list_owned_finds_only_this_tags_pods(fake: FakeRunPod) -> None:
    async def body(p: RunPodProvider) -> list[Instance]:
        for job, tag in (("a1", "burst-a"), ("a2", "burst-a"), ("b1", "burst-a-b"), ("o1", "other")):
            await launch_one(p, job_id=job, tag=tag)
        # A pod made elsewhere (runpod-python style, values inlined) with our name prefix but no env: ours too.
        await p._api.json("POST", "/graphql", json={"query": (
            'mutation { podFindAndDeployOnDemand(input: {cloudType: ALL, gpuCount: 1, gpuTypeId: '
            '"NVIDIA GeForce RTX 4090", name: "burst-a-x9", imageName: "img", ports: "22/tcp"}) { id } }')})
        gone = await launch_one(p, job_id="a3", tag="burst-a")
        await p.terminate(gone.instance_id)
        return await p.list_owned("burst-a")

    owned = run(fake, body)
    assert sorted(str(i.job_id) for i in owned) == ["a1", "a2", "x9"]
    assert {i.tag for i in owned} == {"burst-a"} and len(fake.running()) == 5


def test_terminate_is_retried_after_a_500_and_idempotent(fake: FakeRunPod) -> None:
    async def body(p: RunPodProvider) -> Instance | None:
        inst = await launch_one(p)
        fake.switches.terminate_failures = 1
        await p.terminate(inst.instance_id)
        await p.terminate(inst.instance_id)  # already gone: quiet
        await p.terminate("nosuchpod00000")  # never existed: quiet
        return await p.get(inst.instance_id)

    assert run(fake, body) is None
    assert fake.running() == [] and fake.switches.terminate_failures == 0
    assert all(m.destroyed for m in fake.machines.all)


def test_terminate_raises_other_errors(fake: FakeRunPod) -> None:
    fake.switches.server_errors_next = 100
    with pytest.raises(ProviderError, match="503"):
        run(fake, lambda p: p.terminate("abc"))


# -- a real machine --------------------------------------------------------------------------------------------


@pytest.mark.ssh
def test_launch_boots_a_machine_reachable_with_the_job_key(fake: FakeRunPod, tmp_path: Path) -> None:
    fake.switches.boot_delay = 0.2
    public = make_key(tmp_path / "job_key")

    async def body(p: RunPodProvider) -> tuple[Instance, list[InstanceState | None]]:
        inst = await launch_one(p, key=public)
        seen: list[InstanceState | None] = []
        deadline = time.monotonic() + 20
        current: Instance | None = inst
        while current is not None and current.state is not InstanceState.RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(p.poll_seconds)
            current = await p.get(inst.instance_id)
            seen.append(current.state if current else None)
        assert current is not None
        return current, seen

    inst, seen = run(fake, body)
    assert seen[0] is InstanceState.PENDING and inst.state is InstanceState.RUNNING
    assert inst.endpoint is not None
    machine = fake.pod_machines[inst.instance_id]
    assert (inst.endpoint.host, inst.endpoint.port, inst.endpoint.user) == ("127.0.0.1", machine.port,
                                                                             getpass.getuser())
    ssh = ["ssh", "-i", str(tmp_path / "job_key"), "-p", str(inst.endpoint.port), "-o", "StrictHostKeyChecking=no",
           "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
           f"{inst.endpoint.user}@127.0.0.1", "true"]
    result = subprocess.run(ssh, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr

    assert run(fake, lambda p: p.terminate(inst.instance_id)) is None
    assert run(fake, lambda p: p.get(inst.instance_id)) is None
    assert machine.processes() == [] and fake.running() == []


def test_capacity_message_is_the_documented_one() -> None:
    assert CAPACITY_ERROR.startswith("There are no longer any instances available")


def test_over_real_http_with_its_own_client(fake: FakeRunPod) -> None:
    """The loopback server end-to-end tests point RUNPOD_API_BASE_URL at: same answers over a socket."""

    async def body() -> tuple[list[Offer], Instance | None]:
        provider = RunPodProvider(api_key="test-key", base_url=server.url, ssh_user=getpass.getuser())
        try:
            offers = await provider.offers(OfferQuery(gpu_model="RTX_4090"))
            inst = await provider.launch(offers[0], SPEC, job_id="h1", tag="burst-http", ssh_public_key=KEY)
            await provider.terminate(inst.instance_id)
            return offers, await provider.get(inst.instance_id)
        finally:
            await provider.aclose()

    with fake.serve() as server:
        offers, after = asyncio.run(body())
    assert [o.price_usd_per_hour for o in offers] == [Decimal("0.34"), Decimal("0.69")] and after is None
    assert fake.running() == []
