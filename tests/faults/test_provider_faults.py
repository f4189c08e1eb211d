"""Fault cases 4, 5 and 6: the provider APIs misbehave around a real job on each marketplace.

4. The create response is lost: the fake creates the instance, then drops the connection without a reply; the
   provider finds it by this install's tag and the job id, and the job runs on it.
5. Terminate answers 500 several times before it works.
6. 429 storms: on every endpoint a job uses in turn (search, create, status polls, terminate), ridden out; a
   storm on search that never ends fails the job in one clear line and rents nothing; one that outlasts a status
   poll's retries while booting is waited out at the next poll.

Jobs go through the Python API (the engine behind ``%%burst``) to the fakes behind loopback HTTP servers; their
instances are real sshd processes (tests/marketplaces.py). Each case ends by checking the fakes: nothing left
running, every bill within the cap (tests/fault_figures.py).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import ledger_rows, open_reservations, state_row
from fault_figures import FaultLedger
from marketplaces import Markets
from ssh_boxes import output_lines

import burst_jupyter as burst
from burst_jupyter.events import EventType, JobEvent
from burst_jupyter.job import Job, JobStatus
from burst_jupyter.spec import JobSpec

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

CAP = Decimal(1)
# What each fake sells (tests/fakes/*.py).
GPU = {"vast": "RTX_4090", "runpod": "RTX_4090", "thunder": "H100", "lambda": "H100"}
PROVIDERS = list(GPU)


def submit(provider: str, body: str = "print('ran on the instance')") -> Job:
    return burst.submit(JobSpec(cell=body, provider=provider, gpu_model=GPU[provider], max_cost_usd=CAP),
                        namespace={})


def ledger_row(burst_home: Path, job: Job) -> Any:
    (row,) = [r for r in ledger_rows(burst_home) if r.job_id == job.id]
    return row


# -- 4. the create reply is lost ----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_lost_create_reply_is_found_by_tag_and_ended(provider: str, markets: Markets, fault_ledger: FaultLedger,
                                                       burst_home: Path) -> None:
    cloud = markets.all[provider]
    cloud.switches.drop_create_reply = 1
    job = submit(provider)
    result = job.wait(90)
    assert cloud.switches.drop_create_reply == 0, "the fault was never injected"
    assert len(cloud.machines.all) == 1, "a second instance was rented"
    # The provider found its instance again by tag and job id, and the cell ran on it (one instance, billed once).
    assert result.status is JobStatus.COMPLETED, result.error
    assert ("stdout", "ran on the instance") in output_lines(job)
    (instance_id,) = cloud.bills()
    terminated = [e for e in job.events if e.type is EventType.TERMINATED]
    assert [e.instance_id for e in terminated] == [instance_id]
    row = ledger_row(burst_home, job)
    assert (row.provider, row.instance_id, row.status) == (provider, instance_id, result.status.value)
    assert Decimal(0) < row.actual_usd <= CAP
    assert state_row(burst_home, job.id).state == "terminated"  # type: ignore[union-attr]
    assert open_reservations(burst_home) == []
    bills = fault_ledger.check_clouds("4 lost create reply", markets, CAP, faults=1)
    assert bills[f"{provider}:{instance_id}"] <= row.actual_usd, "the ledger shows less than the provider bills"


# -- 5. terminate fails with 500 several times --------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_terminate_failing_with_500s_is_retried_until_gone(provider: str, markets: Markets,
                                                           fault_ledger: FaultLedger, burst_home: Path) -> None:
    cloud = markets.all[provider]
    failures = 3
    cloud.switches.terminate_failures = failures
    job = submit(provider)
    result = job.wait(90)
    assert result.status is JobStatus.COMPLETED, result.error
    assert cloud.switches.terminate_failures == 0, "terminate was not retried through every failure"
    (terminated,) = [e for e in job.events if e.type is EventType.TERMINATED]
    assert terminated.error is None and terminated.total_cost_usd == result.total_cost_usd
    row = ledger_row(burst_home, job)
    assert row.status == "completed" and Decimal(0) < row.actual_usd <= CAP
    assert state_row(burst_home, job.id).state == "terminated"  # type: ignore[union-attr]
    fault_ledger.check_clouds("5 terminate answers 500", markets, CAP, faults=failures)


# -- 6. 429 storms ------------------------------------------------------------------------------------------------

STORM = 2  # 429s in a row per endpoint, fewer than the client's tries per request (_http.py RetryPolicy: 6)
# The events after which the next request of the job goes to each endpoint in turn.
STORM_AT = {EventType.PROVISIONING: "create", EventType.PROVISIONED: "status polls", EventType.SYNCING_DOWN:
            "terminate"}


def rate_limited(markets: Markets) -> None:
    """RunPod and Thunder are made to send Retry-After (short: the storm, not the wait, is the test). Vast never
    sends one (reference 1.2): its client backs off on its own."""
    for cloud in markets.all.values():
        cloud.switches.retry_after = 0.05


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_429_storm_on_every_endpoint_is_ridden_out(provider: str, markets: Markets, fault_ledger: FaultLedger,
                                                     burst_home: Path) -> None:
    cloud = markets.all[provider]
    rate_limited(markets)
    sent = {"search": STORM}
    cloud.switches.rate_limit_next = STORM  # the search is the job's first request

    def storm(event: JobEvent) -> None:  # on the session loop, before the job's next request
        if event.type in STORM_AT and STORM_AT[event.type] not in sent:
            sent[STORM_AT[event.type]] = STORM
            cloud.switches.rate_limit_next = STORM

    job = submit(provider, "print('through the storm')")
    job.add_listener(storm)
    result = job.wait(90)
    assert result.status is JobStatus.COMPLETED, result.error
    assert ("stdout", "through the storm") in output_lines(job)
    assert set(sent) == {"search", *STORM_AT.values()} and cloud.switches.rate_limit_next == 0
    assert ledger_row(burst_home, job).status == "completed"
    fault_ledger.check_clouds("6 429 storm", markets, CAP, faults=sum(sent.values()))


def test_an_endless_429_storm_on_search_fails_clearly_and_rents_nothing(markets: Markets,
                                                                        fault_ledger: FaultLedger,
                                                                        burst_home: Path) -> None:
    rate_limited(markets)
    switches = markets.runpod.switches
    switches.rate_limit_next = 10**6
    job = submit("runpod", "print('never')")
    result = job.wait(60)
    assert result.status is JobStatus.FAILED
    text = str(result.error)
    assert "no offer could be searched; runpod: POST /graphql: rate limited" in text and "\n" not in text, text
    assert markets.creates() == 0 and ledger_rows(burst_home) == [] and open_reservations(burst_home) == []
    storm, switches.rate_limit_next = 10**6 - switches.rate_limit_next, 0
    fault_ledger.check_clouds("6 429 storm", markets, CAP, faults=storm)


@pytest.mark.parametrize("provider", ["runpod", "thunder", "lambda"])
def test_a_429_storm_outlasting_one_requests_retries_while_booting_is_waited_out(
        provider: str, markets: Markets, fault_ledger: FaultLedger, burst_home: Path) -> None:
    """The storm starts once the instance exists and outlasts one request's tries (6): that status poll gives up,
    the job says the status is unknown for now and asks again at the next poll, within the provisioning deadline."""
    cloud = markets.all[provider]
    rate_limited(markets)
    storm = 6 + STORM

    def on_launch(event: JobEvent) -> None:
        if event.type is EventType.PROVISIONED and cloud.switches.rate_limit_next == 0:
            cloud.switches.rate_limit_next = storm

    job = submit(provider, "print('booted through the storm')")
    job.add_listener(on_launch)
    result = job.wait(90)
    assert cloud.switches.rate_limit_next == 0
    assert result.status is JobStatus.COMPLETED, result.error
    assert any(e.type is EventType.PROVISIONING and "status unknown for now" in (e.message or "")
               for e in job.events)
    assert ("stdout", "booted through the storm") in output_lines(job)
    row = ledger_row(burst_home, job)
    assert row.status == "completed" and Decimal(0) < row.actual_usd <= CAP
    fault_ledger.check_clouds("6 429 storm", markets, CAP, faults=storm)
