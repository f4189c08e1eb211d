"""ThunderProvider against FakeThunder (tests/fakes/thunder.py): offers from the three catalog tables, create with
the job's key, ownership by key comment, uuid -> index lookups that survive renumbering, faults, and one real SSH
login to a booted fake machine."""

from __future__ import annotations

import asyncio
import getpass
import json
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from burst_checks import FAST_RETRY, first_offer, protocol_gaps, run_provider
from fakes.thunder import FakeThunder

from burst_jupyter.errors import ApiError, AuthFailed, ConfigError, NoCapacity, OfferGone
from burst_jupyter.providers.base import Capability, Instance, InstanceState, Offer, OfferQuery, Provider
from burst_jupyter.providers.thunder import PROTOTYPING_LIMITS, ThunderProvider, api_root
from burst_jupyter.spec import JobSpec

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOqXvQ1tYrXq8ZP1l4y2b5n1m3c2d5e6f7a8b9c0d1e2 someone@laptop"
SPEC = JobSpec(cell="print(1)")
TAG = "burst-0123abcd"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeThunder]:
    cloud = FakeThunder(tmp_path)
    cloud.switches.boot_delay = 30.0  # no sshd unless a test wants one (those set a short delay)
    yield cloud
    cloud.close()


def provider(fake: FakeThunder, **kwargs: Any) -> ThunderProvider:
    options: dict[str, Any] = {"api_key": "test-key", "client": fake.client(), "retry": FAST_RETRY,
                               "ssh_user": getpass.getuser(), "poll_seconds": 0.05, **kwargs}
    return ThunderProvider(**options)




async def launch(p: ThunderProvider, job_id: str, *, tag: str = TAG, key: str = KEY, model: str = "H100") -> Instance:
    return await p.launch(await first_offer(p, model), SPEC, job_id=job_id, tag=tag, ssh_public_key=key)


async def wait_running(p: ThunderProvider, uuid: str, timeout: float = 15.0) -> Instance:
    deadline = time.monotonic() + timeout
    while True:
        inst = await p.get(uuid)
        assert inst is not None
        if inst.state is InstanceState.RUNNING or time.monotonic() > deadline:
            return inst
        await asyncio.sleep(p.poll_seconds)


def creates(fake: FakeThunder) -> list[Any]:
    return [r for r in fake.requests if r.path == "/v1/instances/create"]


# -- offers ----------------------------------------------------------------------------------------------------


def test_is_a_provider(fake: FakeThunder) -> None:
    p = provider(fake)
    assert protocol_gaps(p, Provider) == []
    # Rented, with development capacity (prototyping mode), and nothing else: no spot, labels, self-destruct, stop,
    # or image of the user's choice.
    assert p.capabilities == frozenset({Capability.RENTED, Capability.PROTOTYPING})
    assert Capability.CUSTOM_IMAGE not in p.capabilities
    asyncio.run(p.aclose())


def test_api_root_adds_v1_once() -> None:
    assert api_root("https://api.thundercompute.com:8443") == "https://api.thundercompute.com:8443/v1"
    assert api_root("https://api.thundercompute.com:8443/v1/") == "https://api.thundercompute.com:8443/v1"


def test_offers_production_unless_prototyping_is_allowed_canonical_names_decimal_prices(fake: FakeThunder) -> None:
    offers = run_provider(provider(fake), lambda p: p.offers(OfferQuery(gpu_model="ANY")))
    assert [o.offer_id for o in offers] == ["a100xl_x1_production", "h100_x1_production"]  # cheapest first
    a100, h100 = offers
    assert (a100.gpu_model, h100.gpu_model) == ("A100_80GB", "H100")
    assert h100.price_usd_per_hour == Decimal("1.89") and isinstance(h100.price_usd_per_hour, Decimal)
    assert h100.memory_gb == 80 and h100.gpus == 1 and not h100.spot and h100.provider == "thunder"
    assert not h100.prototyping and h100.tier == "production"
    assert dict(h100.extra) == {"gpu_type": "h100", "num_gpus": 1, "mode": "production", "cpu_cores": 18,
                                "disk_size_gb": 100}
    # Catalog endpoints are public: no Authorization needed, but the key is only ever sent as a header.
    assert {r.path for r in fake.requests} == {"/v1/pricing", "/v1/specs", "/v1/status"}


def test_offers_add_the_disk_surcharge_past_100_gb(fake: FakeThunder) -> None:
    offer = run_provider(provider(fake, disk_gb=300), lambda p: first_offer(p))
    assert offer.price_usd_per_hour == Decimal("1.89") + 200 * Decimal("0.0001")
    assert offer.extra["disk_size_gb"] == 300


def test_offers_only_available_specs_and_exact_gpu_count(fake: FakeThunder) -> None:
    def ask(gpus: int) -> list[str]:
        offers: list[Offer] = run_provider(provider(fake), lambda p: p.offers(OfferQuery(gpu_model="H100", gpus=gpus)))
        return [str(o.offer_id) for o in offers]

    assert ask(8) == []  # h100_x8_production is "unavailable" in /v1/status
    fake.availability["h100_x8_production"] = "available"
    assert ask(8) == ["h100_x8_production"]
    assert ask(2) == ["h100_x2_production"]  # not the x4 or x8 as well
    fake.availability["h100_x2_production"] = "sold_out"
    assert ask(2) == []


def test_prototyping_is_offered_only_when_allowed_marked_with_its_limits(fake: FakeThunder) -> None:
    allowed = OfferQuery(gpu_model="ANY", prototyping=True)
    offers = run_provider(provider(fake), lambda p: p.offers(allowed))
    assert [o.offer_id for o in offers][:3] == ["a6000_x1_prototyping", "a100xl_x1_prototyping",
                                                "a100xl_x1_production"]
    a6000, a100_proto, a100_prod = offers[:3]
    assert a6000.gpu_model == "RTX_A6000" and a100_proto.price_usd_per_hour == Decimal("0.78")
    assert a100_prod.price_usd_per_hour == Decimal("1.29")  # each mode at its own price
    assert (a100_proto.prototyping, a100_proto.tier, a100_prod.prototyping, a100_prod.tier) == (
        True, "prototyping", False, "production")
    assert PROTOTYPING_LIMITS in a100_proto.description and PROTOTYPING_LIMITS not in a100_prod.description
    assert "may be interrupted" in PROTOTYPING_LIMITS and "virtualisation" in PROTOTYPING_LIMITS
    assert a100_proto.reliability < a100_prod.reliability  # prototyping "may be interrupted"
    big = run_provider(provider(fake), lambda p: p.offers(OfferQuery(gpu_model="ANY", memory_gb=60,
                                                                       prototyping=True)))
    assert "a6000_x1_prototyping" not in [o.offer_id for o in big]
    not_allowed = run_provider(provider(fake), lambda p: p.offers(OfferQuery(gpu_model="ANY")))
    assert not any(o.prototyping for o in not_allowed) and len(not_allowed) == 2


def test_each_mode_has_its_own_capacity(fake: FakeThunder) -> None:
    """A prototyping create that finds its capacity gone leaves production's, and the search says so after."""
    fake.sold_out_on_create = {"prototyping": 1}

    async def work(p: ThunderProvider) -> tuple[list[Offer], Any]:
        proto, prod = (await p.offers(OfferQuery(gpu_model="A100_80GB", prototyping=True)))[:2]
        with pytest.raises(OfferGone, match="a100xl_x1_prototyping is out of capacity"):
            await p.launch(proto, SPEC, job_id="j1", tag=TAG, ssh_public_key=KEY)
        again = await p.offers(OfferQuery(gpu_model="A100_80GB", prototyping=True))
        return again, await p.launch(prod, SPEC, job_id="j2", tag=TAG, ssh_public_key=KEY)

    again, inst = run_provider(provider(fake), work)
    assert [o.offer_id for o in again] == ["a100xl_x1_production"]
    assert inst.price_usd_per_hour == Decimal("1.29") and [r["mode"] for r in fake.running()] == ["production"]


def test_spot_and_price_ceiling(fake: FakeThunder) -> None:
    assert run_provider(provider(fake), lambda p: p.offers(OfferQuery(gpu_model="H100", spot=True))) == []
    assert fake.requests == []  # not even asked
    cheap = OfferQuery(gpu_model="ANY", max_price_usd_per_hour=Decimal("1.50"))
    assert [o.offer_id for o in run_provider(provider(fake), lambda p: p.offers(cheap))] == ["a100xl_x1_production"]


# -- launch, get, list_owned -----------------------------------------------------------------------------------


def test_launch_sends_the_job_key_with_the_owner_comment(fake: FakeThunder) -> None:
    inst = run_provider(provider(fake), lambda p: launch(p, "job-1"))
    (create,) = creates(fake)
    assert create.method == "POST" and create.headers["authorization"] == "Bearer test-key"
    body = create.body
    assert body == {"cpu_cores": 18, "mode": "production", "template": "base", "gpu_type": "h100", "num_gpus": 1,
                    "disk_size_gb": 100, "ephemeral_disk_gb": 0,
                    "public_key": " ".join(KEY.split()[:2]) + f" {TAG}/job-1"}
    assert all("test-key" not in json.dumps(r.body) for r in fake.requests)
    assert inst.state is InstanceState.PENDING and inst.endpoint is None
    assert inst.instance_id in fake.instances and inst.job_id == "job-1" and inst.tag == TAG
    assert inst.workdir == ".cache/burst/jobs/job-1" and inst.price_usd_per_hour == Decimal("1.89")
    assert "PRIVATE KEY" not in repr(inst)  # the reply's generated key is dropped
    assert fake.machine(inst.instance_id).authorized == [body["public_key"]]


def test_launch_refuses_an_image_and_a_missing_key_before_renting(fake: FakeThunder) -> None:
    async def work(p: ThunderProvider) -> None:
        offer = await first_offer(p)
        with pytest.raises(ConfigError, match="--image is not supported"):
            await p.launch(offer, JobSpec(cell="1", image="ubuntu:24.04"), job_id="j", tag=TAG, ssh_public_key=KEY)
        with pytest.raises(ConfigError, match="public key"):
            await p.launch(offer, SPEC, job_id="j", tag=TAG, ssh_public_key=None)

    run_provider(provider(fake), work)
    assert creates(fake) == [] and fake.running() == []


def test_list_owned_by_key_comment(fake: FakeThunder) -> None:
    async def work(p: ThunderProvider) -> list[Instance]:
        await launch(p, "a")
        await launch(p, "b", model="A100_80GB")
        await launch(p, "c", tag="burst-other")
        return await p.list_owned(TAG)

    owned = run_provider(provider(fake), work)
    assert sorted((i.job_id, i.gpu_model) for i in owned) == [("a", "H100"), ("b", "A100_80GB")]
    assert {i.tag for i in owned} == {TAG} and len(fake.running()) == 3
    assert {i.workdir for i in owned} == {".cache/burst/jobs/a", ".cache/burst/jobs/b"}


def test_get_reads_state_price_and_strings(fake: FakeThunder) -> None:
    async def work(p: ThunderProvider) -> tuple[Instance, Instance | None]:
        inst = await launch(p, "j")
        return inst, await p.get(inst.instance_id)

    launched, got = run_provider(provider(fake), work)
    assert got is not None and got.instance_id == launched.instance_id
    assert got.state is InstanceState.PENDING and got.detail in ("PROVISIONING", "STARTING")
    assert got.price_usd_per_hour == Decimal("1.89") and got.gpu_model == "H100" and got.job_id == "j"
    assert run_provider(provider(fake), lambda p: p.get("no-such-uuid")) is None


def test_get_and_terminate_follow_the_uuid_when_indexes_move(fake: FakeThunder) -> None:
    async def work(p: ThunderProvider) -> None:
        a, b, c = [await launch(p, j) for j in ("a", "b", "c")]
        assert [fake.index_of(i.instance_id) for i in (a, b, c)] == ["0", "1", "2"]
        await p.terminate(a.instance_id)
        assert [fake.index_of(i.instance_id) for i in (b, c)] == ["0", "1"]  # renumbered
        # Another tool deletes b by its index meanwhile: c moves to "0".
        async with httpx.AsyncClient(transport=fake.transport()) as other:
            r = await other.post("https://x/v1/instances/0/delete", headers={"Authorization": "Bearer test-key"})
            assert r.status_code == 200
        got = await p.get(c.instance_id)
        assert got is not None and got.job_id == "c" and fake.index_of(c.instance_id) == "0"
        await p.terminate(c.instance_id)
        assert await p.get(c.instance_id) is None and await p.get(a.instance_id) is None

    run_provider(provider(fake), work)
    assert fake.running() == [] and len(fake.deleted) == 3


def test_terminate_is_idempotent_and_retries_after_a_500(fake: FakeThunder) -> None:
    async def work(p: ThunderProvider) -> None:
        inst = await launch(p, "j")
        fake.switches.terminate_failures = 2
        await p.terminate(inst.instance_id)
        assert await p.get(inst.instance_id) is None
        await p.terminate(inst.instance_id)  # gone already: quiet
        await p.terminate("never-existed")

    run_provider(provider(fake), work)
    deletes = [r for r in fake.requests if r.path.endswith("/delete")]
    assert len(deletes) == 3 and all(r.body is None for r in deletes)
    assert fake.running() == []


def test_terminate_finds_the_index_again_after_a_404(fake: FakeThunder) -> None:
    """Between our list and our delete another delete renumbers the map: our index is now past the end."""
    moved: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/delete") and not moved:
            moved.append(request.url.path)
            with fake.lock:
                fake._delete("0")  # someone else deletes instance 0 first
        return fake.handler(request)

    async def work(p: ThunderProvider) -> None:
        first = await launch(p, "first")
        last = await launch(p, "last")
        p2 = ThunderProvider(api_key="test-key", client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
                             retry=FAST_RETRY)
        try:
            await p2.terminate(last.instance_id)
        finally:
            await p2.aclose()
        assert moved == ["/v1/instances/1/delete"]
        assert fake.instance(last.instance_id) is None and fake.instance(first.instance_id) is None

    run_provider(provider(fake), work)
    assert [r.path for r in fake.requests if r.path.endswith("/delete")] == [
        "/v1/instances/1/delete", "/v1/instances/0/delete"]


# -- faults ----------------------------------------------------------------------------------------------------


def test_bad_token_is_auth_failed_but_the_catalog_is_public(fake: FakeThunder) -> None:
    bad = provider(fake, api_key="wrong")
    offers = run_provider(bad, lambda p: p.offers(OfferQuery(gpu_model="H100")))
    assert offers
    with pytest.raises(AuthFailed, match="Authentication required"):
        run_provider(provider(fake, api_key="wrong"), lambda p: p.get("x"))
    with pytest.raises(AuthFailed):
        run_provider(provider(fake, api_key="wrong"), lambda p: p.launch(offers[0], SPEC, job_id="j", tag=TAG,
                                                                ssh_public_key=KEY))
    assert fake.running() == []


def test_rate_limited_then_success(fake: FakeThunder) -> None:
    fake.switches.rate_limit_next = 2
    fake.switches.retry_after = 0.01
    p = provider(fake)
    assert run_provider(p, lambda p: p.list_owned(TAG)) == []
    assert p._api.calls == 3


def test_capacity_error_is_offer_gone(fake: FakeThunder) -> None:
    async def work(p: ThunderProvider) -> None:
        offer = await first_offer(p)
        fake.switches.capacity_errors = 1
        with pytest.raises(OfferGone, match="capacity") as info:
            await p.launch(offer, SPEC, job_id="j", tag=TAG, ssh_public_key=KEY)
        assert isinstance(info.value, NoCapacity)
        fake.availability[offer.offer_id] = "unavailable"  # gone between search and create
        with pytest.raises(OfferGone):
            await p.launch(offer, SPEC, job_id="j", tag=TAG, ssh_public_key=KEY)

    run_provider(provider(fake), work)
    assert fake.running() == []


def test_create_is_never_resent(fake: FakeThunder) -> None:
    async def work(p: ThunderProvider) -> None:
        offer = await first_offer(p)
        fake.switches.server_errors_next = 1
        with pytest.raises(ApiError) as info:
            await p.launch(offer, SPEC, job_id="j1", tag=TAG, ssh_public_key=KEY)
        assert info.value.status == 503
        fake.switches.drop_create_reply = 1  # carried out, answer lost
        lost = await p.launch(offer, SPEC, job_id="j2", tag=TAG, ssh_public_key=KEY)  # found by its key comment
        assert lost.job_id == "j2"
        assert [i.instance_id for i in await p.list_owned(TAG)] == [lost.instance_id]
        await p.terminate(lost.instance_id)

    run_provider(provider(fake), work)
    assert len(creates(fake)) == 2 and fake.running() == []


@pytest.mark.ssh
def test_running_needs_an_ip_and_port_0_means_22(fake: FakeThunder) -> None:
    fake.ip_lag = 1  # the first list after boot shows RUNNING with ip null

    async def work(p: ThunderProvider) -> None:
        fake.switches.boot_delay = 0.0
        inst = await launch(p, "j")
        fake.machine(inst.instance_id).wait_ready()
        early = await p.get(inst.instance_id)
        assert early is not None and early.state is InstanceState.PENDING and early.endpoint is None
        assert early.detail == "RUNNING, no IP yet"
        up = await p.get(inst.instance_id)
        assert up is not None and up.state is InstanceState.RUNNING and up.endpoint is not None
        record = fake.instance(inst.instance_id)
        assert record is not None
        record["port"] = 0
        again = await p.get(inst.instance_id)
        assert again is not None and again.endpoint is not None and again.endpoint.port == 22

    run_provider(provider(fake), work)


def test_boot_failure_is_failed_then_terminated(fake: FakeThunder) -> None:
    async def work(p: ThunderProvider) -> None:
        fake.switches.boot_delay = 0.0
        fake.switches.boot_fails = 1
        inst = await launch(p, "j")
        got = await p.get(inst.instance_id)
        assert got is not None and got.state is InstanceState.FAILED and got.detail == "UNKNOWN"
        await p.terminate(inst.instance_id)

    run_provider(provider(fake), work)
    assert fake.running() == []


def test_loopback_server_and_v1_base(fake: FakeThunder) -> None:
    """The real HTTP path (what end-to-end tests use through TNR_API_URL), with a base that already ends in /v1."""
    with fake.serve() as server:
        p = ThunderProvider(api_key="test-key", base_url=f"{server.url}/v1", retry=FAST_RETRY)
        inst = run_provider(p, lambda p: launch(p, "j"))
        assert run_provider(ThunderProvider(api_key="test-key", base_url=server.url, retry=FAST_RETRY),
                   lambda p: p.list_owned(TAG))[0].instance_id == inst.instance_id
    assert {r.path for r in fake.requests} >= {"/v1/instances/create", "/v1/instances/list"}


# -- real sshd -------------------------------------------------------------------------------------------------


@pytest.mark.ssh
def test_provisioning_to_running_with_user_override(fake: FakeThunder) -> None:
    fake.switches.boot_delay = 0.3

    async def work(p: ThunderProvider) -> tuple[Instance, Instance]:
        inst = await launch(p, "j")
        first = await p.get(inst.instance_id)
        assert first is not None
        return first, await wait_running(p, inst.instance_id)

    first, up = run_provider(provider(fake), work)
    assert first.state is InstanceState.PENDING and first.detail == "PROVISIONING" and first.endpoint is None
    machine = fake.machine(up.instance_id)
    assert up.state is InstanceState.RUNNING and up.detail == "RUNNING"
    assert up.endpoint is not None and (up.endpoint.host, up.endpoint.port) == ("127.0.0.1", machine.port)
    assert up.endpoint.user == getpass.getuser()
    default = run_provider(provider(fake, ssh_user=None), lambda p: p.get(up.instance_id))
    assert default is not None and default.endpoint is not None and default.endpoint.user == "ubuntu"


@pytest.mark.ssh
def test_real_ssh_login_with_the_job_key_then_terminate(fake: FakeThunder, tmp_path: Path) -> None:
    key = tmp_path / "job_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{TAG}/job", "-f", str(key)], check=True)
    public = Path(f"{key}.pub").read_text().strip()
    fake.switches.boot_delay = 0.0

    async def work(p: ThunderProvider) -> Instance:
        inst = await launch(p, "job", key=public)
        up = await wait_running(p, inst.instance_id)
        assert up.state is InstanceState.RUNNING and up.endpoint is not None
        (owned,) = await p.list_owned(TAG)
        assert owned.job_id == "job"
        ep = up.endpoint
        ssh = ["ssh", "-i", str(key), "-p", str(ep.port), "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
               f"{ep.user}@{ep.host}", "true"]
        done = subprocess.run(ssh, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        await p.terminate(inst.instance_id)
        assert await p.get(inst.instance_id) is None
        return inst

    inst = run_provider(provider(fake), work)
    assert fake.machine(inst.instance_id).processes() == [] and fake.running() == []
