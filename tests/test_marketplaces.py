"""%%burst on the marketplaces, end to end: the three provider fakes behind loopback HTTP servers, their
instances real sshd processes (tests/marketplaces.py).

Each test runs the real path: a concurrent search of all three fakes, the cheapest fitting offer, the create
call with this install's tag and a fresh per-job key, polling until the machine runs, SSH with the host key
pinned at first contact, the agent, sync back, terminate confirmed by the provider, and the ledger. The
``markets`` fixture then checks that no instance is left running at any fake and no process on any machine.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, last_job, ledger_rows, ok, open_reservations, run_cell, state_row, usage_line, write
from marketplaces import Markets

from burst_jupyter.events import EventType
from burst_jupyter.job import JobStatus

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

# The fakes' books (tests/fakes/*.py): the cheapest fitting single RTX 4090 is Vast ask 4102 at $0.298/h
# (RunPod's is $0.34/h, Thunder has no RTX 4090); ask 4104 at $0.33/h has no direct SSH port.
CHEAPEST = ("vast", "4102", Decimal("0.298"))


def only_row(home: Path, job_id: str) -> Any:
    rows = [r for r in ledger_rows(home) if r.job_id == job_id]
    assert len(rows) == 1, rows
    return rows[0]


def test_the_cheapest_fitting_offer_runs_the_cell_and_is_gone_after(ip: Any, markets: Markets, tmp_path: Path,
                                                                     burst_home: Path) -> None:
    write(tmp_path / "out" / "old.txt", "before")
    result, streams = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --mount ./out:out:rw --pull answer", """
        import os
        print("hello from", os.environ["BURST_JOB_ID"] if "BURST_JOB_ID" in os.environ else "the box")
        open("out/new.txt", "w").write("made remotely")
        answer = 6 * 7
    """))
    ok(result, streams)
    job = last_job()
    assert ip.user_ns["answer"] == 42
    assert (tmp_path / "out" / "new.txt").read_text() == "made remotely"
    assert "hello from" in streams.text("stdout")
    selected = next(e for e in job.events if e.type is EventType.OFFER_SELECTED)
    assert (selected.provider, selected.cost_per_hour_usd) == (CHEAPEST[0], CHEAPEST[2])
    instance = markets.vast.instance(int(job_instance(job)))
    assert instance.row["label"] == job.plan.tag  # this install's owner tag, so list_owned finds it at Vast
    row = only_row(burst_home, job.id)
    assert (row.provider, row.status, row.rate_usd_per_hour) == ("vast", "completed", CHEAPEST[2])
    assert Decimal(0) < row.actual_usd <= Decimal(1)
    assert state_row(burst_home, job.id).state == "terminated"
    assert open_reservations(burst_home) == []
    assert not (burst_home / "keys" / job.id).exists(), "the job's key outlived its instance"


def job_instance(job: Any) -> str:
    return next(e.instance_id for e in job.events if e.type is EventType.PROVISIONED)


def test_auto_rents_lambda_when_it_is_cheapest_and_leaves_no_key_in_the_account(ip: Any, markets: Markets,
                                                                                 tmp_path: Path,
                                                                                 burst_home: Path) -> None:
    lam = markets.lambda_cloud
    lam.instance_types["gpu_1x_h100_pcie"]["price_cents_per_hour"] = 150  # under Thunder's $1.89 H100
    write(tmp_path / "out" / "old.txt", "before")
    result, streams = run_cell(ip, cell("--gpu H100 --max-cost 1 --mount ./out:out:rw --pull answer", """
        open("out/new.txt", "w").write("made on lambda")
        answer = 6 * 7
    """))
    ok(result, streams)
    job = last_job()
    assert ip.user_ns["answer"] == 42 and (tmp_path / "out" / "new.txt").read_text() == "made on lambda"
    selected = next(e for e in job.events if e.type is EventType.OFFER_SELECTED)
    assert (selected.provider, selected.cost_per_hour_usd) == ("lambda", Decimal("1.5"))
    (launch,) = [r for r in lam.requests if r.path.endswith("/instance-operations/launch")]
    assert {"key": "burst-owner", "value": job.plan.tag} in launch.body["tags"]
    assert launch.body["name"] == f"{job.plan.tag}/{job.id}"
    (key_name,) = launch.body["ssh_key_names"]
    assert key_name.startswith(f"{job.plan.tag}-{job.id}-")
    deleted = [r for r in lam.requests if r.method == "DELETE" and r.path.startswith("/api/v1/ssh-keys/")]
    assert len(deleted) == 1 and lam.leaked() == [], "the job's key outlived its instance in the account"
    assert [k["name"] for k in lam.keys.values()] == ["my-laptop"]  # the user's own key is never touched
    row = only_row(burst_home, job.id)
    assert (row.provider, row.status, row.rate_usd_per_hour) == ("lambda", "completed", Decimal("1.5"))
    assert state_row(burst_home, job.id).state == "terminated"
    assert not (burst_home / "keys" / job.id).exists()


def test_no_secret_reaches_the_instance(ip: Any, markets: Markets) -> None:
    result, streams = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --pull env,argv", """
        import os, sys
        env = dict(os.environ)
        argv = open("/proc/self/cmdline").read()
    """))
    ok(result, streams)
    seen = repr(ip.user_ns["env"]) + ip.user_ns["argv"]
    for cloud in markets.all.values():
        assert cloud.api_key not in seen
    for cloud in markets.all.values():
        for request in cloud.requests:
            assert cloud.api_key not in repr(request.body), f"{cloud.name} got the API key in a body"


def test_dry_run_shows_the_offer_and_rents_nothing(ip: Any, markets: Markets, burst_home: Path) -> None:
    result, _ = run_cell(ip, cell("--gpu RTX_4090 --max-cost 2 --dry-run"))
    assert result.error_in_exec is None
    text = repr(result.result)
    assert "would rent: vast 1 x RTX_4090 at $0.298/h" in text and "[vast:4102]" in text
    assert "worst case: $2.00" in text and "nothing was rented" in text
    assert markets.creates() == 0 and ledger_rows(burst_home) == []


def test_dry_run_without_a_cap_shows_the_rate_times_the_maximum_duration(ip: Any, markets: Markets) -> None:
    result, _ = run_cell(ip, cell("--gpu H100 --max-duration 60 --dry-run"))
    text = repr(result.result)
    first = text.splitlines()[0]
    rate = Decimal(first.split(" at $")[1].split("/h")[0])
    assert f"worst case: ${rate:.2f}" in text and "at most 60 min" in text


def test_an_offer_taken_between_search_and_create_moves_on(ip: Any, markets: Markets, burst_home: Path) -> None:
    markets.vast.switches.take_offer_on_create = 1
    result, streams = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1", "print('ran')"))
    ok(result, streams)
    job = last_job()
    assert "vast:4102 has no capacity now" in said(job) and "moving on to " in said(job)
    row = only_row(burst_home, job.id)
    assert row.status == "completed" and row.rate_usd_per_hour > CHEAPEST[2]


def said(job: Any) -> str:
    """What burst told the user in the job's own output (its ``burst: ...`` lines)."""
    return "".join(e.text or "" for e in job.events if e.type is EventType.OUTPUT and e.stream == "stderr")


def selected(job: Any) -> list[tuple[str | None, Decimal | None]]:
    return [(e.provider, e.cost_per_hour_usd) for e in job.events if e.type is EventType.OFFER_SELECTED]


def runpod_clouds(markets: Markets) -> list[str]:
    """The cloudType of each RunPod create, in order."""
    return [r.body["variables"]["input"]["cloudType"] for r in markets.runpod.requests
            if isinstance(r.body, dict) and "podFindAndDeployOnDemand" in str(r.body.get("query"))]


def test_a_billed_rate_not_the_quote_ends_the_instance_whatever_max_price_says(ip: Any, markets: Markets,
                                                                                 burst_home: Path) -> None:
    markets.vast.bill_markup = Decimal(2)  # the host bills twice what the search quoted
    result, _ = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --max-price 1 --provider vast"))
    line = usage_line(result)  # both figures, as priced, not rounded to the cent
    assert "bills $0.596/h; vast:4102 quoted $0.298/h: the instance was ended at once" in line
    job = last_job()
    assert job.result().status is JobStatus.FAILED
    row = only_row(burst_home, job.id)  # what it billed until it was ended is on the books, at the billed rate
    assert row.rate_usd_per_hour == Decimal("0.596") and row.status == "failed"


def test_a_runpod_pod_billed_above_its_quote_is_ended_and_its_offer_not_offered_again(
        ip: Any, markets: Markets, burst_home: Path) -> None:
    markets.runpod.bill_markup = Decimal(2)
    result, _ = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --provider runpod"))
    line = usage_line(result)
    assert "bills $0.68/h; runpod:NVIDIA_GeForce_RTX_4090@community quoted $0.34/h" in line
    assert "ended at once, and this offer is not offered again in this session" in line
    row = only_row(burst_home, last_job().id)
    assert (row.rate_usd_per_hour, row.status) == (Decimal("0.68"), "failed") and Decimal(0) < row.actual_usd
    text = repr(ip.run_line_magic("burst", "offers --gpu RTX_4090 --provider runpod"))
    rows = [line for line in text.splitlines() if line.startswith("runpod ")]
    assert len(rows) == 1 and "@secure" in rows[0]
    assert ("runpod:NVIDIA_GeForce_RTX_4090@community left out for this session: quoted $0.34/h, billed $0.68/h"
            in text)
    markets.runpod.bill_markup = Decimal(1)
    result, streams = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --provider runpod", "print('again')"))
    ok(result, streams)
    assert runpod_clouds(markets) == ["COMMUNITY", "SECURE"]  # the next run takes the next offer


def test_a_billed_rate_within_rounding_of_the_quote_runs_billed_at_that_rate(ip: Any, markets: Markets,
                                                                              burst_home: Path) -> None:
    markets.vast.bill_markup = Decimal("1.01")  # $0.298 -> $0.30098: a float sum's rounding, not another price
    result, streams = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --provider vast", "print('ran')"))
    ok(result, streams)
    job = last_job()
    assert "vast bills $0.301/h (quoted $0.298/h)" in said(job)
    assert only_row(burst_home, job.id).rate_usd_per_hour == Decimal("0.30098")


def test_capacity_gone_on_community_cloud_moves_on_to_secure_at_its_price_now(ip: Any, markets: Markets,
                                                                             burst_home: Path) -> None:
    ip.run_line_magic("burst", "offers --gpu RTX_4090 --provider runpod")  # the offer cache holds secure at $0.69
    markets.runpod.set_cloud("NVIDIA GeForce RTX 4090", "SECURE", price="0.50")  # the market moved since
    markets.runpod.sold_out_on_create = {"COMMUNITY": 1}  # its last 4090s went between search and create
    result, streams = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --provider runpod", "print('ran')"))
    ok(result, streams)
    job = last_job()
    # The next offer comes from a search past the cache: at the cached $0.69 it would bill $0.50, a misquote.
    assert selected(job) == [("runpod", Decimal("0.34")), ("runpod", Decimal("0.50"))]
    assert "runpod:NVIDIA_GeForce_RTX_4090@community has no capacity now" in said(job)
    assert "moving on to runpod:NVIDIA_GeForce_RTX_4090@secure at $0.50/h" in said(job)
    assert runpod_clouds(markets) == ["COMMUNITY", "SECURE"]
    row = only_row(burst_home, job.id)
    assert (row.provider, row.status, row.rate_usd_per_hour) == ("runpod", "completed", Decimal("0.50"))


def test_capacity_gone_moves_on_to_the_next_offer_by_price_on_any_provider(ip: Any, markets: Markets,
                                                                           burst_home: Path) -> None:
    markets.runpod.set_cloud("NVIDIA GeForce RTX 4090", "COMMUNITY", price="0.20")  # the cheapest 4090 now
    markets.runpod.sold_out_on_create = {"COMMUNITY": 1}
    result, streams = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1", "print('ran')"))
    ok(result, streams)
    job = last_job()
    # Next by price is Vast's $0.298 ask, not RunPod's own secure cloud at $0.69.
    assert selected(job) == [("runpod", Decimal("0.20")), CHEAPEST[::2]]
    assert "moving on to vast:4102 at $0.298/h" in said(job)
    row = only_row(burst_home, job.id)
    assert (row.provider, row.status, row.rate_usd_per_hour) == ("vast", "completed", CHEAPEST[2])


def test_when_no_offer_is_left_the_error_names_every_offer_tried(ip: Any, markets: Markets) -> None:
    markets.runpod.sold_out_on_create = {"COMMUNITY": 1, "SECURE": 1}
    result, _ = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --provider runpod"))
    line = usage_line(result)
    assert ("tried 2 offers (runpod:NVIDIA_GeForce_RTX_4090@community, then runpod:NVIDIA_GeForce_RTX_4090@secure); "
            "none could be rented (the last: runpod:NVIDIA_GeForce_RTX_4090@secure has no capacity now") in line
    assert markets.runpod.running() == []


def test_thunder_prototyping_is_rented_only_when_allowed(ip: Any, markets: Markets, burst_home: Path) -> None:
    result, _ = run_cell(ip, cell("--gpu A100_80GB --max-cost 1 --dry-run"))
    assert repr(result.result).startswith("would rent: vast 1 x A100_80GB at $1.12/h")  # not prototyping's $0.78
    result, _ = run_cell(ip, cell("--gpu A100_80GB --max-cost 1 --provider thunder --dry-run"))
    assert "[thunder:a100xl_x1_production]" in repr(result.result)
    result, streams = run_cell(ip, cell("--gpu A100_80GB --max-cost 1 --prototyping", "print('proto')"))
    ok(result, streams)
    job = last_job()
    assert selected(job) == [("thunder", Decimal("0.78"))]
    (create,) = [r for r in markets.thunder.requests if r.path == "/v1/instances/create"]
    assert (create.body["mode"], create.body["gpu_type"]) == ("prototyping", "a100xl")
    offer_event = next(e for e in job.events if e.type is EventType.OFFER_SELECTED)
    assert "long-running GPU processes may be interrupted" in (offer_event.message or "")
    assert only_row(burst_home, job.id).rate_usd_per_hour == Decimal("0.78")


def test_an_instance_that_never_boots_is_ended_before_the_next_offer(ip: Any, markets: Markets,
                                                                      burst_home: Path) -> None:
    markets.vast.switches.boot_fails = 1
    result, streams = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --provider vast", "print('second try')"))
    ok(result, streams)
    first, second = markets.vast.machines.all[:2]
    assert first.destroyed and second.destroyed
    assert "second try" in streams.text("stdout")


def test_a_429_storm_on_search_and_create_still_runs(ip: Any, markets: Markets) -> None:
    for cloud in markets.all.values():
        cloud.switches.rate_limit_next = 3
    result, streams = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1", "print('through')"))
    ok(result, streams)
    # The search asked every fake, so each served its three 429s and the job rode them out.
    assert {name: cloud.switches.rate_limit_next for name, cloud in markets.all.items()} == dict.fromkeys(
        markets.all, 0)


def test_spot_rents_at_the_bid(ip: Any, markets: Markets, burst_home: Path) -> None:
    result, streams = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --spot --provider vast", "print('spot')"))
    ok(result, streams)
    job = last_job()
    created = markets.vast.instance(int(job_instance(job)))
    assert created.row["is_bid"] is True
    assert only_row(burst_home, job.id).rate_usd_per_hour == Decimal("0.150")


def test_a_marketplace_without_a_key_is_one_clear_error(ip: Any, markets: Markets,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAST_API_KEY")
    result, _ = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --provider vast"))
    assert "provider vast has no API key: set VAST_API_KEY" in usage_line(result)
    assert markets.creates() == 0


def test_no_offer_fits_is_one_clear_error(ip: Any, markets: Markets) -> None:
    result, _ = run_cell(ip, cell("--gpu RTX_4090 --max-cost 1 --max-price 0.05"))
    assert "offer fits 1 x RTX_4090 under $0.05/h" in usage_line(result)
    assert markets.creates() == 0


def test_providers_status_and_offers_text(ip: Any, markets: Markets) -> None:
    status = repr(ip.run_line_magic("burst", "providers"))
    assert "vast: available, " in status and "lowest RTX_4090 = $0.298/hr" in status
    assert "runpod: available" in status and "thunder: available" in status and "lambda: available" in status
    browser = ip.run_line_magic("burst", "offers --gpu RTX_4090 --max-price 0.5")
    text = repr(browser)
    rows = [line.split()[0] for line in text.splitlines()[2:] if line.strip()]
    assert rows[:2] == ["vast", "runpod"] and "thunder" not in rows  # cheapest first across providers; no 4090s
    assert "$0.298" in text and "$0.34" in text
    markets.runpod.api_key = "rotated"  # a provider that refuses is reported, not fatal
    status = repr(ip.run_line_magic("burst", "providers"))
    assert "runpod: not answering: the API key was refused" in status and "vast: available" in status
