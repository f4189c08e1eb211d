"""LambdaProvider against FakeLambda (tests/fakes/lambda_cloud.py): offers per instance type and region with
capacity, the {"data"} envelope and its errors, the job's account-wide SSH key registered at launch and deleted
once the instance is confirmed gone (never left behind: a leftover key is a leak), ownership by tags and name,
the orphan pass over keys, faults, and one real SSH login to ``ip``:22."""

from __future__ import annotations

import asyncio
import base64
import getpass
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from burst_checks import FAST_RETRY, first_offer, run_provider
from fakes.lambda_cloud import FakeLambda

from burst_jupyter.errors import ApiError, AuthFailed, ConfigError, ConnectFailed, OfferGone
from burst_jupyter.providers.base import Capability, Instance, InstanceState, Offer, OfferQuery, terminate_confirmed
from burst_jupyter.providers.lambda_cloud import KEY_GRACE_SECONDS, LambdaProvider, api_root, parse_gpu
from burst_jupyter.spec import JobSpec

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOqXvQ1tYrXq8ZP1l4y2b5n1m3c2d5e6f7a8b9c0d1e2 burst-0123abcd/job"
SPEC = JobSpec(cell="print(1)")
TAG = "burst-0123abcd"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeLambda]:
    cloud = FakeLambda(tmp_path)
    cloud.switches.boot_delay = 30.0  # no sshd unless a test wants one (those set a short delay)
    yield cloud
    cloud.close()


def provider(fake: FakeLambda, **kwargs: Any) -> LambdaProvider:
    options: dict[str, Any] = {"api_key": "test-key", "client": fake.client(), "retry": FAST_RETRY,
                               "ssh_user": getpass.getuser(), "poll_seconds": 0.01, **kwargs}
    return LambdaProvider(**options)




async def launch(p: LambdaProvider, job_id: str, *, tag: str = TAG, key: str = KEY) -> Instance:
    return await p.launch(await first_offer(p), SPEC, job_id=job_id, tag=tag, ssh_public_key=key)


def requests(fake: FakeLambda, method: str, path: str) -> list[Any]:
    return [r for r in fake.requests if r.method == method and r.path == f"/api/v1{path}"]


# -- offers ----------------------------------------------------------------------------------------------------


def test_declares_no_self_destruct_and_no_image(fake: FakeLambda) -> None:
    p = provider(fake)
    # Rented, and nothing else: no spot, labels, self-destruct, stop, or image of the user's choice.
    assert p.name == "lambda" and p.capabilities == frozenset({Capability.RENTED})
    asyncio.run(p.aclose())


def test_api_root_adds_the_api_path_once() -> None:
    assert api_root("https://cloud.lambda.ai") == "https://cloud.lambda.ai/api/v1"
    assert api_root("https://cloud.lambdalabs.com/api/v1/") == "https://cloud.lambdalabs.com/api/v1"


def test_parse_gpu_reads_count_model_and_memory() -> None:
    assert parse_gpu("8x A100 (80 GB SXM4)") == (8, "A100", 80)
    assert parse_gpu("H100 (80 GB PCIe)") == (None, "H100", 80)
    assert parse_gpu("A6000 (48 GB)") == (None, "A6000", 48)
    assert parse_gpu("CPU only") is None


def test_one_offer_per_type_and_region_with_capacity_cheapest_first(fake: FakeLambda) -> None:
    offers = run_provider(provider(fake), lambda p: p.offers(OfferQuery(gpu_model="ANY")))
    # gpu_1x_a10 is a GPU burst does not know; gpu_1x_a100 has no capacity anywhere; 2x and 8x are other counts.
    assert [o.offer_id for o in offers] == ["gpu_1x_a6000@us-east-1", "gpu_1x_h100_pcie@us-east-1",
                                            "gpu_1x_h100_pcie@us-west-1", "gpu_1x_h100_sxm5@us-south-1"]
    a6000, h100 = offers[0], offers[1]
    assert (a6000.gpu_model, h100.gpu_model) == ("RTX_A6000", "H100")
    assert h100.price_usd_per_hour == Decimal("2.49") and isinstance(h100.price_usd_per_hour, Decimal)
    assert (h100.memory_gb, h100.gpus, h100.spot, h100.location) == (80, 1, False, "Virginia, USA")
    assert dict(h100.extra) == {"instance_type_name": "gpu_1x_h100_pcie", "region_name": "us-east-1"}
    assert h100.ref == "lambda:gpu_1x_h100_pcie@us-east-1"


def test_exact_gpu_count_memory_picks_the_a100_and_the_1_4_string_price(fake: FakeLambda) -> None:
    fake.capacity["gpu_8x_a100_80gb_sxm4"] = ["us-west-1"]
    fake.capacity["gpu_1x_a100"] = ["us-west-1"]
    fake.instance_types["gpu_1x_a100"]["price_cents_per_hour"] = "129"  # 1.4.0's example sent a string (4.3)
    p = provider(fake)

    async def work(p: LambdaProvider) -> tuple[list[Offer], list[Offer], list[Offer]]:
        return (await p.offers(OfferQuery(gpu_model="A100_80GB", gpus=8)),
                await p.offers(OfferQuery(gpu_model="A100_40GB")),
                await p.offers(OfferQuery(gpu_model="H100", gpus=2)))

    eight, forty, two = run_provider(p, work)
    assert [(o.offer_id, o.gpus, o.memory_gb, o.price_usd_per_hour) for o in eight] == [
        ("gpu_8x_a100_80gb_sxm4@us-west-1", 8, 80, Decimal("14.32"))]
    assert [(o.gpu_model, o.price_usd_per_hour) for o in forty] == [("A100_40GB", Decimal("1.29"))]
    assert [o.offer_id for o in two] == ["gpu_2x_h100_sxm5@us-south-1"]


def test_no_spot_and_a_price_ceiling(fake: FakeLambda) -> None:
    async def work(p: LambdaProvider) -> tuple[list[Offer], list[Offer]]:
        return (await p.offers(OfferQuery(gpu_model="H100", spot=True)),
                await p.offers(OfferQuery(gpu_model="H100", max_price_usd_per_hour=Decimal("3"))))

    spot, cheap = run_provider(provider(fake), work)
    assert spot == [] and [o.offer_id for o in cheap] == ["gpu_1x_h100_pcie@us-east-1", "gpu_1x_h100_pcie@us-west-1"]


# -- launch and the job's key ------------------------------------------------------------------------------------


def test_launch_registers_the_job_key_and_sends_one_name_and_the_owner_tag(fake: FakeLambda) -> None:
    clock = Clock()
    inst = run_provider(provider(fake, clock=clock), lambda p: launch(p, "job-1"))
    name = f"{TAG}-job-1-{int(clock.now)}"
    ((key_request,), (launched,)) = requests(fake, "POST", "/ssh-keys"), requests(fake, "POST",
                                                                                     "/instance-operations/launch")
    assert key_request.body == {"name": name, "public_key": KEY}
    assert launched.body == {"region_name": "us-east-1", "instance_type_name": "gpu_1x_h100_pcie",
                             "ssh_key_names": [name], "name": f"{TAG}/job-1",
                             "tags": [{"key": "burst-owner", "value": TAG}, {"key": "burst-job", "value": "job-1"}]}
    assert len(inst.instance_id) == 32 and inst.state is InstanceState.PENDING and inst.job_id == "job-1"
    assert inst.price_usd_per_hour == Decimal("2.49") and inst.workdir.endswith("/job-1")
    assert fake.leaked() == [name]  # in use until the instance is confirmed gone


def test_launch_refuses_an_image_and_a_missing_key_before_registering_anything(fake: FakeLambda) -> None:
    async def work(p: LambdaProvider) -> None:
        offer = await first_offer(p)
        with pytest.raises(ConfigError, match="--image is not supported"):
            await p.launch(offer, JobSpec(cell="1", image="pytorch/pytorch"), job_id="j", tag=TAG, ssh_public_key=KEY)
        with pytest.raises(ConfigError, match="SSH public key"):
            await p.launch(offer, SPEC, job_id="j", tag=TAG, ssh_public_key=None)

    run_provider(provider(fake), work)
    assert requests(fake, "POST", "/ssh-keys") == [] and fake.instances == {}


def test_capacity_taken_since_the_search_is_offer_gone_and_the_key_is_deleted(fake: FakeLambda) -> None:
    async def work(p: LambdaProvider) -> None:
        offer = await first_offer(p)
        fake.capacity["gpu_1x_h100_pcie"].remove("us-east-1")  # taken between the search and the launch
        with pytest.raises(OfferGone, match=r"out of capacity.*insufficient-capacity"):
            await p.launch(offer, SPEC, job_id="j", tag=TAG, ssh_public_key=KEY)
        fake.switches.capacity_errors = 1
        with pytest.raises(OfferGone):
            await launch(p, "j")

    run_provider(provider(fake), work)
    assert fake.instances == {} and fake.leaked() == [] and len(fake.keys) == 1  # the user's own key stays


def test_a_refused_launch_deletes_its_key_and_says_why(fake: FakeLambda) -> None:
    async def work(p: LambdaProvider) -> None:
        offer = await first_offer(p)
        fake.instance_types.pop("gpu_1x_h100_pcie")  # retired between search and launch: 404 with a suggestion
        with pytest.raises(ApiError, match=r"does not exist\. \(global/object-does-not-exist\); Check the instance"):
            await p.launch(offer, SPEC, job_id="j", tag=TAG, ssh_public_key=KEY)

    run_provider(provider(fake), work)
    assert fake.leaked() == []


def test_a_launch_refused_for_the_account_deletes_its_key(fake: FakeLambda) -> None:
    def inactive(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/launch"):
            request.read()
            return httpx.Response(403, json={"error": {"code": "global/account-inactive", "message": "inactive"}})
        return fake.handler(request)

    p = provider(fake, client=httpx.AsyncClient(transport=httpx.MockTransport(inactive)))
    with pytest.raises(AuthFailed, match="account-inactive"):
        run_provider(p, lambda p: launch(p, "j"))
    assert fake.leaked() == [] and fake.instances == {}


def test_a_lost_launch_reply_is_found_by_tag_never_resent_and_its_key_kept(fake: FakeLambda) -> None:
    fake.switches.drop_create_reply = 1
    inst = run_provider(provider(fake), lambda p: launch(p, "job-lost"))
    assert len(requests(fake, "POST", "/instance-operations/launch")) == 1 and len(fake.instances) == 1
    assert inst.instance_id in fake.instances and inst.job_id == "job-lost" and inst.tag == TAG
    assert len(fake.leaked()) == 1  # the instance holds it


def test_a_lost_launch_reply_that_made_nothing_raises(fake: FakeLambda) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/launch"):
            raise httpx.ReadTimeout("no answer", request=request)
        return fake.handler(request)

    p = provider(fake, client=httpx.AsyncClient(transport=httpx.MockTransport(refuse)))
    with pytest.raises(ConnectFailed, match="may have been carried out"):
        run_provider(p, lambda p: launch(p, "j"))
    assert len(fake.leaked()) == 1  # nobody knows yet whether an instance holds it: the orphan pass decides


def test_a_key_whose_reply_was_lost_is_reused_by_name(fake: FakeLambda) -> None:
    clock = Clock()
    fake.add_key(f"{TAG}-j-{int(clock.now)}", KEY)  # made by a first try whose answer never came
    inst = run_provider(provider(fake, clock=clock), lambda p: launch(p, "j"))
    assert fake.instances[inst.instance_id]["ssh_key_names"] == [f"{TAG}-j-{int(clock.now)}"]
    assert len(fake.leaked()) == 1


# -- get, terminate, and the key after ---------------------------------------------------------------------------


def test_terminate_is_confirmed_through_terminating_and_terminated_then_the_key_goes(fake: FakeLambda) -> None:
    fake.terminating_polls, fake.terminated_polls = 2, 1

    async def work(p: LambdaProvider) -> None:
        inst = await launch(p, "job")
        assert (await p.get(inst.instance_id)).state is InstanceState.PENDING  # type: ignore[union-attr]
        await p.terminate(inst.instance_id)
        seen = await p.get(inst.instance_id)
        assert seen is not None and seen.state is InstanceState.STOPPED and seen.detail == "terminating"
        assert fake.leaked() != [], "the key went before the instance was confirmed gone"
        assert await terminate_confirmed(p, inst.instance_id, timeout=10) is None

    run_provider(provider(fake), work)
    assert fake.leaked() == [] and fake.running() == [] and len(fake.keys) == 1


def test_terminate_is_idempotent_and_rides_out_a_500(fake: FakeLambda) -> None:
    async def work(p: LambdaProvider) -> None:
        await p.terminate("0" * 32)  # never existed: quietly done
        inst = await launch(p, "job")
        fake.switches.terminate_failures = 2
        assert await terminate_confirmed(p, inst.instance_id, timeout=10) is None
        await p.terminate(inst.instance_id)  # gone: still quiet

    run_provider(provider(fake), work)
    assert fake.switches.terminate_failures == 0 and fake.leaked() == []


def test_a_fresh_provider_learns_the_key_and_deletes_it_once_the_instance_is_gone(fake: FakeLambda) -> None:
    inst = run_provider(provider(fake), lambda p: launch(p, "job"))
    # A fresh provider, as a reaper's is: it was never told the instance's key.
    assert run_provider(provider(fake), lambda p: terminate_confirmed(p, inst.instance_id, timeout=10)) is None
    assert fake.leaked() == []


def test_running_needs_active_and_an_ip_on_port_22(fake: FakeLambda) -> None:
    async def work(p: LambdaProvider) -> Instance:
        inst = await launch(p, "job")
        row = fake.instances[inst.instance_id]
        row.update(status="active", ip=None)
        assert (await p.get(inst.instance_id)).detail == "active, no IP yet"  # type: ignore[union-attr]
        row.update(ip="203.0.113.5")
        up = await p.get(inst.instance_id)
        assert up is not None and up.state is InstanceState.RUNNING and up.price_usd_per_hour == Decimal("2.49")
        return up

    up = run_provider(provider(fake, ssh_user=None), work)
    assert (up.endpoint.host, up.endpoint.port, up.endpoint.user) == ("203.0.113.5", 22, "ubuntu")  # type: ignore[union-attr]
    assert up.gpu_model == "H100" and up.job_id == "job" and up.tag == TAG


# -- ownership and the orphan pass -------------------------------------------------------------------------------


def test_list_owned_by_tags_or_name_and_not_others(fake: FakeLambda) -> None:
    async def work(p: LambdaProvider) -> list[Instance]:
        mine = await launch(p, "by-tags")
        by_name = await launch(p, "by-name")
        fake.instances[by_name.instance_id]["tags"] = []  # a row without tags: its name still says whose it is
        await launch(p, "theirs", tag="burst-ffffffff")
        assert mine.instance_id
        return await p.list_owned(TAG)

    owned = run_provider(provider(fake), work)
    assert sorted(i.job_id or "" for i in owned) == ["by-name", "by-tags"] and {i.tag for i in owned} == {TAG}


def test_the_orphan_pass_deletes_our_unused_keys_past_the_grace_only(fake: FakeLambda) -> None:
    clock = Clock()
    old = int(clock.now - KEY_GRACE_SECONDS - 1)
    fake.add_key(f"{TAG}-gone-job-{old}", KEY)  # a leak: old, no instance uses it
    fake.add_key(f"burst-ffffffff-other-{old}", KEY)  # another install's: not ours to judge

    async def work(p: LambdaProvider) -> None:
        inst = await launch(p, "live")
        clock.now += KEY_GRACE_SECONDS * 2  # the live instance's key is old now, but in use
        fake.add_key(f"{TAG}-starting-{int(clock.now - 5)}", KEY)  # a launch about to use it
        (owned,) = await p.list_owned(TAG)
        assert owned.instance_id == inst.instance_id

    run_provider(provider(fake, clock=clock), work)
    names = fake.leaked()
    assert f"{TAG}-gone-job-{old}" not in names and f"burst-ffffffff-other-{old}" in names
    assert any(n.startswith(f"{TAG}-live-") for n in names) and len(names) == 3
    assert "my-laptop" in [k["name"] for k in fake.keys.values()]


# -- the API's edges ---------------------------------------------------------------------------------------------


def test_a_bad_key_is_auth_failed_naming_lambdas_code(fake: FakeLambda) -> None:
    with pytest.raises(AuthFailed, match="invalid-api-key"):
        run_provider(provider(fake, api_key="wrong"), lambda p: p.offers(OfferQuery(gpu_model="H100")))


def test_the_fake_takes_basic_auth_as_curl_sends_it(fake: FakeLambda) -> None:
    for header in (f"Basic {base64.b64encode(b'test-key:').decode()}", "Basic test-key", "Bearer test-key"):
        reply = fake.handler(httpx.Request("GET", "http://x/api/v1/ssh-keys", headers={"authorization": header}))
        assert reply.status_code == 200 and "data" in reply.json()
    reply = fake.handler(httpx.Request("GET", "http://x/api/v1/ssh-keys", headers={"authorization": "Basic eDo="}))
    assert reply.json()["error"]["code"] == "global/invalid-api-key"


def test_a_cloudflare_429_is_ridden_out(fake: FakeLambda) -> None:
    fake.switches.rate_limit_next = 3
    offers = run_provider(provider(fake), lambda p: p.offers(OfferQuery(gpu_model="H100")))
    assert offers and fake.switches.rate_limit_next == 0
    assert fake.too_many().text == "error code: 1015"


def test_the_fake_refuses_what_lambda_refuses(fake: FakeLambda) -> None:
    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = httpx.Request("POST", f"http://x/api/v1{path}", json=body,
                                headers={"authorization": "Bearer test-key"})
        return dict(fake.handler(request).json())

    base = {"region_name": "us-east-1", "instance_type_name": "gpu_1x_h100_pcie", "ssh_key_names": ["my-laptop"]}
    assert post("/ssh-keys", {"name": "my-laptop", "public_key": KEY})["error"]["message"] == "Key name must be unique"
    assert post("/instance-operations/launch", {**base, "ssh_key_names": []})["error"]["code"] == \
        "global/invalid-parameters"
    assert post("/instance-operations/launch", {**base, "quantity": 2})["error"]["message"] == \
        "Requested too many instances."
    assert post("/instance-operations/launch", {**base, "ssh_key_names": ["nope"]})["error"]["code"] == \
        "global/object-does-not-exist"
    assert post("/instance-operations/launch", {**base, "region_name": "us-south-1"})["error"]["code"] == \
        "instance-operations/launch/insufficient-capacity"
    assert fake.instances == {}


# -- a real machine ----------------------------------------------------------------------------------------------


@pytest.mark.ssh
def test_real_ssh_login_on_port_22_with_the_job_key_then_terminate(fake: FakeLambda, tmp_path: Path) -> None:
    key = tmp_path / "job_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{TAG}/job", "-f", str(key)], check=True)
    public = Path(f"{key}.pub").read_text().strip()
    fake.switches.boot_delay = 0.0

    async def work(p: LambdaProvider) -> Instance:
        inst = await launch(p, "job", key=public)
        deadline = time.monotonic() + 15
        up = await p.get(inst.instance_id)
        while up is not None and up.state is not InstanceState.RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            up = await p.get(inst.instance_id)
        assert up is not None and up.endpoint is not None and up.endpoint.port == 22
        assert up.endpoint.host != "127.0.0.1"  # an address of its own, as each Lambda instance has
        ep = up.endpoint
        ssh = ["ssh", "-i", str(key), "-p", str(ep.port), "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
               f"{ep.user}@{ep.host}", "nvidia-smi"]
        done = subprocess.run(ssh, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "H100" in done.stdout, done.stderr
        assert await terminate_confirmed(p, inst.instance_id, timeout=10) is None
        return inst

    inst = run_provider(provider(fake), work)
    assert fake.machine(inst.instance_id).processes() == [] and fake.running() == [] and fake.leaked() == []
