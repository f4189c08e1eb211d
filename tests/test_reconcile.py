"""Reconciliation (reconcile.py), the fourth layer against a leaked instance, on the three marketplace fakes behind
loopback HTTP servers (tests/marketplaces.py).

Leaks are planted at the fake the way a lost create reply leaves them: an instance labelled with this install's tag
(and the job id in its env) that the state store does not know, or knows as ended. A dry run lists them with their
rate and cost so far and ends nothing; a cleanup ends them and bills them as "leaked"; instances of live jobs are
never touched; the passes at load and while jobs run end leaks on their own; a provider that refuses is reported
while the others are still reconciled. The ``markets`` fixture then checks that nothing is left running.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import db_file, ledger_rows, state_row, wait_until
from marketplaces import Markets

import burst_jupyter as burst
from burst_jupyter import EventType, JobSpec, JobStatus, cli, reconcile
from burst_jupyter.budget import Budget
from burst_jupyter.handoff import Handoff
from burst_jupyter.parts import install_tag
from burst_jupyter.paths import burst_home as home_dir
from burst_jupyter.state import Owner, StateStore

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def nothing_unseen() -> Iterator[None]:
    """Reports kept for the notebook are process-wide: start and end each test without any."""
    reconcile.wait_background()
    reconcile.take_unseen()
    yield
    reconcile.wait_background()
    reconcile.take_unseen()


@pytest.fixture
def store(burst_home: Path) -> Iterator[StateStore]:
    home_dir()  # creates BURST_HOME
    s = StateStore(db_file(burst_home))
    yield s
    s.close()


def plant(markets: Markets, job_id: str | None, *, minutes_ago: float = 30, rate: str = "0.40") -> str:
    """An instance at Vast labelled with this install's tag, as a lost create reply leaves one (no machine)."""
    inst = markets.vast.add_instance(label=install_tag(home_dir()), start_date=time.time() - minutes_ago * 60,
                                     dph_total=float(rate),
                                     extra_env=[["BURST_JOB_ID", job_id]] if job_id is not None else [])
    return str(inst.row["id"])


def launch_at_runpod(job_id: str) -> str:
    """A pod made through the provider's own launch with this install's tag, its reply then lost (no state row)."""
    from burst_jupyter.connections import Connections
    from burst_jupyter.providers import ProviderConfig, build_provider
    from burst_jupyter.providers.base import OfferQuery

    async def launch() -> str:
        provider: Any = build_provider(ProviderConfig(name="runpod"), connections=Connections(), home=home_dir())
        try:
            offer = (await provider.offers(OfferQuery(gpu_model="RTX_4090")))[0]
            made = await provider.launch(offer, JobSpec(cell="pass"), job_id=job_id, tag=install_tag(home_dir()),
                                         ssh_public_key=None)
            return str(made.instance_id)
        finally:
            await provider.aclose()

    return asyncio.run(launch())


def launch_at_lambda(job_id: str, public_key: str) -> str:
    """An instance made through Lambda's own launch with this install's tag and a job key registered for it, its
    reply then lost (no state row): the instance and the key are both leaks."""
    from burst_jupyter.connections import Connections
    from burst_jupyter.providers import ProviderConfig, build_provider
    from burst_jupyter.providers.base import OfferQuery

    async def launch() -> str:
        provider: Any = build_provider(ProviderConfig(name="lambda"), connections=Connections(), home=home_dir())
        try:
            offer = (await provider.offers(OfferQuery(gpu_model="H100")))[0]
            made = await provider.launch(offer, JobSpec(cell="pass"), job_id=job_id, tag=install_tag(home_dir()),
                                         ssh_public_key=public_key)
            return str(made.instance_id)
        finally:
            await provider.aclose()

    return asyncio.run(launch())


def runpod_status(markets: Markets, pod_id: str) -> str:
    pod = markets.runpod.pod(pod_id)
    assert pod is not None
    return str(pod["desiredStatus"])


def gone(markets: Markets, instance_id: str) -> bool:
    return markets.vast.instances[int(instance_id)].destroyed


def line_of(text: str, instance_id: str) -> str:
    return next(line for line in text.splitlines() if f" {instance_id} " in line)


def state_of(home: Path, job_id: str) -> str:
    row = state_row(home, job_id)
    assert row is not None, job_id
    return row.state


def dead_owner() -> Owner:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return Owner(socket.gethostname(), proc.pid, None)


def test_a_leak_is_listed_by_a_dry_run_then_ended_and_billed_once(markets: Markets, burst_home: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    leak = plant(markets, "lost-1", minutes_ago=30, rate="0.40")

    assert cli.main(["cleanup", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(dry run): 1 instance(s) no live job owns; nothing was ended" in out
    listed = line_of(out, leak)
    for part in ("vast", "lost-1", "$0.40", "30m", "$0.20", "would end: leaked, not in the state store"):
        assert part in listed, listed
    assert "asked vast, runpod, thunder, lambda" in out
    assert not gone(markets, leak) and ledger_rows(burst_home) == []

    assert cli.main(["cleanup"]) == 0
    out = capsys.readouterr().out
    assert "ended 1 of 1 instance(s)" in out and "ended: leaked" in line_of(out, leak)
    assert gone(markets, leak)
    (row,) = ledger_rows(burst_home)
    assert (row.job_id, row.provider, row.instance_id, row.status) == ("lost-1", "vast", leak, "leaked")
    assert row.rate_usd_per_hour == Decimal("0.4")
    assert Decimal("0.19") < row.actual_usd < Decimal("0.25")  # 30 min at $0.40/h, and the seconds since
    assert "not in the state store" in row.message and "burst cleanup" in row.message

    again = burst.cleanup()
    assert again.findings == () and again.ok and "nothing to end" in repr(again)
    assert len(ledger_rows(burst_home)) == 1


def test_a_lambda_leak_is_ended_and_its_account_key_deleted(markets: Markets, burst_home: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    leak = launch_at_lambda("lost-lambda", Path(f"{key}.pub").read_text().strip())
    assert len(markets.lambda_cloud.leaked()) == 1

    assert cli.main(["cleanup"]) == 0
    out = capsys.readouterr().out
    assert "ended 1 of 1 instance(s)" in out and "ended: leaked" in line_of(out, leak)
    assert markets.lambda_cloud.running() == [] and markets.lambda_cloud.leaked() == []
    (row,) = ledger_rows(burst_home)
    assert (row.job_id, row.provider, row.instance_id, row.status) == ("lost-lambda", "lambda", leak, "leaked")


def test_a_launch_in_flight_protects_its_instance_and_ended_rows_do_not(markets: Markets, burst_home: Path,
                                                                        store: StateStore) -> None:
    me = Owner.current()
    # A launch of a live process: its intent row holds no instance id yet, and the create has reached Vast.
    store.record_intent("racing-1", "vast", me, Handoff(tag=install_tag(home_dir())))
    racing = plant(markets, "racing-1")
    nameless = plant(markets, None)  # the tag, but no job id: it may be that launch's too
    report = burst.cleanup()
    assert (report.protected, report.findings) == (2, ())
    assert not gone(markets, racing) and not gone(markets, nameless)

    # That launch is then recorded as failed (its reply was lost), and another job ended and was billed, yet its
    # instance is still there (a terminate that did not take).
    store.mark_abandoned("racing-1")
    done = plant(markets, "done-1", minutes_ago=5)
    store.record_intent("done-1", "vast", me, Handoff())
    store.record_launched("done-1", done, Handoff())
    store.mark_terminated("done-1")
    now = dt.datetime.now(dt.timezone.utc)
    with Budget(db_file(burst_home)) as budget:
        budget.settle("done-1", provider="vast", instance_id=done, gpu="RTX_4090", rate_usd_per_hour=Decimal("0.4"),
                      started_at=now - dt.timedelta(minutes=5), ended_at=now, actual_usd=Decimal("0.03"),
                      status="completed")

    report = burst.cleanup()
    assert report.ok and report.protected == 0
    assert {(f.job_id, f.why) for f in report.ended} == {
        ("racing-1", "its launch was recorded as failed, but the instance was made"),
        (None, "carries this install's tag but no job id"),
        ("done-1", "its job ended, but the instance was still there"),
    }
    assert all(gone(markets, i) for i in (racing, nameless, done))
    rows = {r.job_id: r for r in ledger_rows(burst_home)}
    assert set(rows) == {"racing-1", f"vast-{nameless}", "done-1"}
    assert rows["racing-1"].status == rows[f"vast-{nameless}"].status == "leaked"
    assert rows["done-1"].status == "completed"  # billed once: its own row stands
    assert state_of(burst_home, "racing-1") == "terminated"


def test_rows_of_a_dead_kernel_are_reaped_even_when_their_instance_is_gone(ip: Any, markets: Markets,
                                                                           burst_home: Path,
                                                                           store: StateStore) -> None:
    dead = dead_owner()
    launched = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)).isoformat()
    handoff = Handoff.from_json({"provider_config": {"name": "vast"}, "tag": install_tag(home_dir()), "rate": "0.40",
                                 "launched_at": launched, "name": "stranded"})
    alive = plant(markets, "orphan-1", minutes_ago=10)
    for job_id, instance_id in (("orphan-1", alive), ("vanished-1", "999")):  # 999: Vast has no such instance
        store.record_intent(job_id, "vast", dead, handoff)
        store.record_launched(job_id, instance_id, handoff)

    dry = repr(ip.run_line_magic("burst", "cleanup --dry-run"))
    assert "2 instance(s) no live job owns" in dry
    for instance_id in (alive, "999"):
        listed = line_of(dry, instance_id)
        assert "$0.40" in listed and "10m" in listed and f"would end: stranded, its process (pid {dead.pid}" in listed
    assert not gone(markets, alive)

    report = ip.run_line_magic("burst", "cleanup")
    assert report.ok and {f.job_id for f in report.ended} == {"orphan-1", "vanished-1"}
    assert gone(markets, alive)
    for job_id in ("orphan-1", "vanished-1"):
        assert state_of(burst_home, job_id) == "terminated"
    rows = {r.job_id: r for r in ledger_rows(burst_home)}
    assert set(rows) == {"orphan-1", "vanished-1"}
    for row in rows.values():
        assert row.status == "cancelled" and "burst cleanup; finished by the reaper" in row.message
        assert Decimal("0.06") <= row.actual_usd < Decimal("0.1")  # 10 min at $0.40/h, and the seconds since


def test_a_kernel_that_died_during_the_create_is_billed_never_0_and_counts_against_the_caps(
        markets: Markets, burst_home: Path, store: StateStore) -> None:
    dead, tag = dead_owner(), install_tag(home_dir())
    # Its instance was made and is still there, and its intent (written before intents carried the rate) has no
    # rate: it bills at the rate the provider lists.
    store.record_intent("midcreate-1", "vast", dead,
                        Handoff.from_json({"provider_config": {"name": "vast"}, "tag": tag}))
    alive = plant(markets, "midcreate-1", minutes_ago=10, rate="0.40")
    # Its instance is gone (its boot watchdog ended it), or was never made: billed as made, at the intent's rate,
    # from the intent until now, at most the job's cap.
    intent_at = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)).isoformat()
    store.record_intent("midcreate-2", "vast", dead, Handoff.from_json(
        {"provider_config": {"name": "vast"}, "tag": tag, "rate": "0.40", "launched_at": intent_at,
         "max_cost_usd": "0.05", "gpu": "RTX_4090", "name": "held"}))

    report = burst.cleanup()
    assert report.ok and {f.job_id for f in report.ended} == {"midcreate-1", "midcreate-2"}
    assert gone(markets, alive)
    rows = {r.job_id: r for r in ledger_rows(burst_home)}
    assert rows["midcreate-1"].rate_usd_per_hour == Decimal("0.4") and rows["midcreate-1"].actual_usd > 0
    unseen = rows["midcreate-2"]
    assert (unseen.status, unseen.rate_usd_per_hour, unseen.actual_usd, unseen.gpu) == (
        "leaked", Decimal("0.4"), Decimal("0.05"), "RTX_4090")  # 10 min at $0.40/h is $0.067: held to the cap
    assert "lists no instance of it" in unseen.message
    assert {state_of(burst_home, j) for j in rows} == {"terminated"}
    with Budget(db_file(burst_home)) as budget:
        usage = budget.snapshot()
    assert usage.day.spent == usage.week.spent == sum(r.actual_usd for r in rows.values())


def test_a_live_job_survives_reconciliation_mid_job_and_the_periodic_pass_ends_a_leak(
        ip: Any, markets: Markets, burst_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.burst]\nreconcile-interval-seconds = 0.2\n")
    go = tmp_path / "go"
    job = burst.submit(JobSpec(cell=f"import os, time\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\n"
                                    "print('survived')", provider="vast", gpu_model="RTX_4090", max_cost_usd="1"))
    wait_until(lambda: any(e.type is EventType.STARTED for e in job.events), "the cell started", limit=90)
    instance_id = next(e.instance_id for e in job.events if e.type is EventType.PROVISIONED)
    assert instance_id is not None
    leak = plant(markets, "lost-3")

    log = burst_home / "logs" / "reconcile.log"
    wait_until(lambda: log.exists() and leak in log.read_text(), "the periodic pass ended the leak")
    assert gone(markets, leak)
    ip.run_line_magic("burst", "jobs")  # the next %burst command says what that pass did
    told = capsys.readouterr().out
    assert "burst: reconciled while jobs ran: ended 1 of 1" in told and "lost-3" in line_of(told, leak)

    report = burst.cleanup()  # and one asked for, while the job runs
    assert report.findings == () and report.protected == 1
    assert not job.done() and not gone(markets, instance_id)
    go.touch()
    result = job.wait(90)
    assert result.status is JobStatus.COMPLETED, result.error
    rows = {r.job_id: r.status for r in ledger_rows(burst_home)}
    assert rows == {job.id: "completed", "lost-3": "leaked"}


def test_the_pass_at_load_ends_a_leak_in_the_background(ip: Any, markets: Markets, burst_home: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    leak = plant(markets, "lost-4")
    ip.run_line_magic("reload_ext", "burst_jupyter")  # the fixture loaded it before the marketplaces were set up
    assert leak not in capsys.readouterr().out  # the load says only what it knows without asking anyone
    wait_until(lambda: gone(markets, leak), "the load-time pass ended the leak")
    reconcile.wait_background()
    (row,) = ledger_rows(burst_home)
    assert (row.job_id, row.status) == ("lost-4", "leaked") and "reconciled at load" in row.message
    assert leak in (burst_home / "logs" / "reconcile.log").read_text()

    ip.run_line_magic("burst", "ledger")
    told = capsys.readouterr().out
    assert "burst: reconciled at load: ended 1 of 1" in told and "lost-4" in line_of(told, leak)
    ip.run_line_magic("burst", "ledger")
    assert "reconciled at load" not in capsys.readouterr().out  # said once


def test_a_provider_that_refuses_is_reported_and_the_others_are_still_reconciled(
        markets: Markets, burst_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    leak = plant(markets, "lost-5")
    pod = launch_at_runpod("lost-6")
    key, markets.runpod.api_key = markets.runpod.api_key, "rotated"  # every RunPod call is refused
    markets.thunder.switches.server_errors_next = 1  # a passing 503 is retried, not a failure

    dry = burst.cleanup(dry_run=True)
    assert not dry.ok and set(dry.errors) == {"runpod"} and not gone(markets, leak)

    assert cli.main(["cleanup"]) == 1
    out = capsys.readouterr().out
    assert "runpod: could not be asked: the API key was refused" in out
    assert "ended 1 of 1" in out and gone(markets, leak)
    assert [(r.job_id, r.status) for r in ledger_rows(burst_home)] == [("lost-5", "leaked")]
    assert runpod_status(markets, pod) != "TERMINATED"

    markets.runpod.api_key = key  # RunPod answers again: its leak goes too
    report = burst.cleanup()
    assert report.ok and [(f.provider, f.instance_id, f.job_id) for f in report.ended] == [("runpod", pod, "lost-6")]
    assert runpod_status(markets, pod) == "TERMINATED"
    row = next(r for r in ledger_rows(burst_home) if r.job_id == "lost-6")
    # RunPod's pod record as read gives no creation time (providers/runpod.py): how long it billed is unknown.
    assert row.status == "leaked" and row.actual_usd is None and row.rate_usd_per_hour > 0
