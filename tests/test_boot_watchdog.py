"""The boot watchdog (providers/_boot_watchdog.py): the dead-man's switch each Vast and RunPod create request arms,
run by the fakes on their sshd machines the way the providers run a start script (in the instance's environment,
with the instance-scoped key the provider injected). Launched here through each provider's own ``launch``.

It ends an instance that nobody took over when the job's money runs out (the silence path is fault cases 15 and
16, tests/faults/test_boot_kill.py); it stands down for good once the agent's supervisor runs; and the create
request carries it within the provider's size limit, with no account key in it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from burst_checks import wait_until
from fakes.base import FakeMachine
from marketplaces import Markets

from burst_jupyter import JobSpec
from burst_jupyter.connections import Connections
from burst_jupyter.parts import install_tag
from burst_jupyter.paths import burst_home as home_dir
from burst_jupyter.providers import ProviderConfig, build_provider
from burst_jupyter.providers._boot_watchdog import START_SCRIPT_LIMIT
from burst_jupyter.providers.base import REMOTE_JOB_ROOT, BootWatch, OfferQuery

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

ACCOUNT_KEYS = {"vast": "canary-vast-account-key-3f9a", "runpod": "canary-runpod-account-key-7c21"}


@pytest.fixture
def market_keys() -> dict[str, str]:
    return dict(ACCOUNT_KEYS)


def launch(name: str, job_id: str, watch: BootWatch) -> str:
    async def run() -> str:
        provider: Any = build_provider(ProviderConfig(name=name), connections=Connections(), home=home_dir())
        try:
            offer = (await provider.offers(OfferQuery(gpu_model="RTX_4090")))[0]
            made = await provider.launch(offer, JobSpec(cell="pass"), job_id=job_id, tag=install_tag(home_dir()),
                                         ssh_public_key=None, watch=watch)
            return str(made.instance_id)
        finally:
            await provider.aclose()

    return asyncio.run(run())


def terminate(name: str, instance_id: str) -> None:
    async def run() -> None:
        provider: Any = build_provider(ProviderConfig(name=name), connections=Connections(), home=home_dir())
        try:
            await provider.terminate(instance_id)
        finally:
            await provider.aclose()

    asyncio.run(run())


def ended_by(markets: Markets, name: str, instance_id: str) -> str | None:
    if name == "vast":
        return markets.vast.instance(instance_id).destroyed_by
    return markets.runpod.terminated_by(instance_id)


def machine(markets: Markets, name: str, instance_id: str) -> FakeMachine:
    if name == "vast":
        found = markets.vast.instance(instance_id).machine
        assert found is not None
        return found
    return markets.runpod.pod_machines[instance_id]


def start_script(markets: Markets, name: str) -> str:
    """What the create request carried as the instance's start script."""
    if name == "vast":
        (create,) = [r for r in markets.vast.requests if r.method == "PUT" and "/asks/" in r.path]
        return str(create.body["onstart"])
    (create,) = [r for r in markets.runpod.requests if "podFindAndDeployOnDemand" in str(r.body)]
    return str(create.body["variables"]["input"]["dockerArgs"])


def watchdogs(m: FakeMachine) -> list[int]:
    """The machine's watchdog processes (their command line names the supervisor's pid file)."""
    found = []
    for pid in m.processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"supervisor.pid" in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.parametrize("name", ["vast", "runpod"])
def test_an_instance_nobody_took_over_ends_itself_with_its_scoped_key_when_the_money_runs_out(
        name: str, markets: Markets) -> None:
    iid = launch(name, "boot-money", BootWatch(lease_seconds=600, end_by=time.time() + 2))
    script = start_script(markets, name)
    assert len(script) <= START_SCRIPT_LIMIT
    assert ACCOUNT_KEYS[name] not in script and "canary" not in script  # only the instance's own key, read there
    wait_until(lambda: ended_by(markets, name, iid) is not None, "the instance to end itself", limit=60)
    assert ended_by(markets, name, iid) == "scoped"


@pytest.mark.parametrize("name", ["vast", "runpod"])
def test_the_watchdog_stands_down_once_the_agents_supervisor_runs(name: str, markets: Markets) -> None:
    deadline = time.time() + 8
    iid = launch(name, "boot-taken", BootWatch(lease_seconds=1, end_by=deadline))
    m = machine(markets, name, iid)
    m.wait_ready()
    jobdir = m.home / REMOTE_JOB_ROOT / "boot-taken"
    jobdir.mkdir(parents=True)
    (jobdir / "supervisor.pid").write_text("1")  # what the agent writes once its own switch holds
    wait_until(lambda: m.ready and watchdogs(m) == [], "the watchdog to stand down", limit=30)
    wait_until(lambda: time.time() > deadline + 2, "past the money deadline", limit=30)
    assert ended_by(markets, name, iid) is None  # a job the agent holds is never ended by the watchdog
    terminate(name, iid)
    assert ended_by(markets, name, iid) == "account"
