"""The agent's dead-man's switch, end to end, on the provider fakes (real sshd machines) and this machine.

A job's client goes silent the way a dead kernel's does: the job is marked handed off (as the exit hooks mark it)
but no reaper is started, so nobody renews the agent's lease. After ``--lease`` seconds the agent stops the cell
and, per provider: on Vast and RunPod it uploads the results to the result sink's presigned URL (when there is
one) and ends its own instance with the key the provider injected into it, never the account key; on Thunder
and Lambda (no such key) and on local and ssh it stops the job, removes its ``work/`` and keeps the results for ``burst
cleanup``, which brings them home. The agent's own deadline and its watchdog after the cell ended take the same
path. The ``markets`` fixture ends every test checking that nothing is left running or alive on any fake machine.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from burst_checks import wait_until
from kernels import processes_mentioning
from marketplaces import Markets
from ssh_boxes import output_lines

# The real moto S3 server of test_sinks.py, reused (module-scoped server, a bucket per test).
from test_sinks import Store, aws_env, moto_endpoint, store  # noqa: F401

import burst_jupyter as burst
from burst_jupyter import agent
from burst_jupyter.connections import Connections
from burst_jupyter.events import EventType, JobEvent
from burst_jupyter.job import Job, JobStatus
from burst_jupyter.providers.base import REMOTE_JOB_ROOT, Endpoint
from burst_jupyter.providers.vast import VastProvider
from burst_jupyter.sinks import open_sink
from burst_jupyter.spec import JobSpec
from burst_jupyter.sync import write_bundle
from burst_jupyter.variables import unpack_pulled
from burst_jupyter.widgets import JobView

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

LEASE = 2
SLACK = 45.0  # what a loaded 2-core machine may add to a lapse: only turns a hang into a failure

# Writes into its rw mount and defines a pulled value, then waits to be stopped (the stop is a KeyboardInterrupt,
# after which the agent still saves the pulled values).
CELL = textwrap.dedent("""
    import time
    open("out/partial.txt", "w").write("written before the client went silent")
    answer = 42
    print("ready", flush=True)
    time.sleep(120)
""")

GPU = {"vast": "RTX_4090", "runpod": "RTX_4090", "thunder": "H100", "lambda": "H100", "local": None}


def submit(provider: str, **fields: Any) -> Job:
    spec = JobSpec(cell=CELL, provider=provider, gpu_model=GPU[provider], lease_seconds=LEASE,
                   mount_local=["./out:out:rw"], pull=["answer"],
                   max_cost_usd=Decimal(1) if provider != "local" else None, **fields)
    return burst.submit(spec, namespace={})


def go_silent(job: Job) -> None:
    """Once the cell runs, the client stops renewing the lease: handed off, as by the exit hooks, to no reaper."""
    wait_until(lambda: ("stdout", "ready") in output_lines(job), "the cell to start", limit=90)
    job.handed_off.set()
    assert job.wait(60).status is JobStatus.CANCELLED


def protected(job: Job) -> str:
    """The one line the job view shows, then the layers behind it (on hover or expand)."""
    (event,) = [e for e in job.events if e.type is EventType.PROTECTED]
    assert event.message is not None and event.text is not None
    assert "\n" not in event.message and "`" not in event.message + event.text
    return f"{event.message}\n{event.text}"


def remote_jobdir(machine: Any, job_id: str) -> Path:
    return Path(machine.home) / REMOTE_JOB_ROOT / job_id


def exit_reason(jobdir: Path) -> str:
    return str(json.loads((jobdir / "exit.json").read_text())["reason"])


def pulled(values_pkl: bytes) -> dict[str, Any]:
    return unpack_pulled(values_pkl, ["answer"]).values


# -- marketplaces with an instance-scoped key ---------------------------------------------------------------------


def test_vast_lapse_uploads_the_results_then_destroys_the_instance_with_its_own_key(
        markets: Markets, store: Store, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "out").mkdir()
    job = submit("vast", result_sink=f"s3://{store.bucket}/runs")
    wait_until(lambda: any(e.type is EventType.STARTED for e in job.events), "the job to start", limit=90)
    markets.vast.switches.terminate_failures = 1  # the agent's first destroy gets a 500: it tries again
    go_silent(job)
    (inst,) = markets.vast.instances.values()
    wait_until(lambda: inst.destroyed, "the agent to destroy its own instance", limit=LEASE + SLACK)
    assert inst.destroyed_by == "scoped"  # CONTAINER_API_KEY, found on the machine; not the account key
    jobdir = remote_jobdir(inst.machine, job.id)
    assert exit_reason(jobdir) == "lease"
    log = (jobdir / "agent.log").read_text()
    assert "the lease lapsed" in log and "(try 2)" in log and "results stored in the result sink" in log
    # The results as `results` sends them: the rw changes (m/<mount>/...) and the pulled values.
    archive = store.objects()[f"runs/{job.id}/{agent.LAPSE_ARCHIVE}"]
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert tar.extractfile("m/0/partial.txt").read() == b"written before the client went silent"  # type: ignore[union-attr]
        assert pulled(tar.extractfile("values.out.pkl").read())["answer"] == 42  # type: ignore[union-attr]
    # Only the recipe and a one-object upload URL went in the manifest: no key of any kind.
    manifest = (jobdir / "job.json").read_text()
    assert json.loads(manifest)["self_destruct"]["key_env"] == "CONTAINER_API_KEY"
    assert markets.vast.api_key not in manifest and str(inst.scoped_key) not in manifest
    assert protected(job).startswith(f"If this notebook dies, the machine shuts itself down within {LEASE:g} s.\n")
    assert "vast scoped key" in protected(job) and f"{store.bucket}/runs/{job.id}/lapse-results.tar" in protected(job)
    # The next cleanup cannot reach the instance (its agent ended it), so it brings the results home from the sink.
    assert not (tmp_path / "out" / "partial.txt").exists()
    report = burst.cleanup()
    assert report.ok, report
    assert (tmp_path / "out" / "partial.txt").read_text() == "written before the client went silent"


def test_runpod_lapse_terminates_the_pod_with_its_own_key(markets: Markets, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    job = submit("runpod")
    go_silent(job)
    (pod_id,) = markets.runpod.pods
    wait_until(lambda: markets.runpod.terminated_by(pod_id) is not None, "the agent to terminate its own pod",
               limit=LEASE + SLACK)
    assert markets.runpod.terminated_by(pod_id) == "scoped"  # RUNPOD_API_KEY of the pod, not the account's
    assert "runpod scoped key" in protected(job) and "end with the instance" in protected(job)
    assert not (tmp_path / "out" / "partial.txt").exists()  # no sink the instance can reach: the results are lost


def test_a_kernel_gone_right_after_its_cell_ended_still_leaves_nothing_billing(markets: Markets,
                                                                              tmp_path: Path) -> None:
    """The watchdog: the cell has ended, the client went silent before destroying anything."""

    def silence(event: JobEvent) -> None:
        if event.type is EventType.SYNCING_DOWN:  # the exit record has just arrived
            job.handed_off.set()

    job = burst.submit(JobSpec(cell="print('done')", provider="vast", gpu_model="RTX_4090", lease_seconds=LEASE,
                               max_cost_usd=Decimal(1)), namespace={})
    job.add_listener(silence)
    job.wait(90)
    (inst,) = markets.vast.instances.values()
    wait_until(lambda: inst.destroyed, "the watchdog to destroy the instance", limit=LEASE + SLACK)
    assert inst.destroyed_by == "scoped"
    assert exit_reason(remote_jobdir(inst.machine, job.id)) == "ok"


# -- no scoped key: the job stops, the results wait, `burst cleanup` brings them home ---------------------------------


@pytest.mark.parametrize("provider", ["thunder", "lambda", "local"])
def test_without_a_scoped_key_the_job_stops_and_cleanup_brings_the_results_home(
        provider: str, markets: Markets, tmp_path: Path, burst_home: Path) -> None:
    (tmp_path / "out").mkdir()
    job = submit(provider)
    go_silent(job)
    if provider != "local":
        (machine,) = markets.all[provider].machines.all
        jobdir = remote_jobdir(machine, job.id)
        assert f"{provider} has no scoped key" in protected(job)
        assert protected(job).startswith(f"If this notebook dies, the job stops within {LEASE:g} s; the machine is "
                                         "ended the next time burst loads (or by burst cleanup).\n")
    else:
        jobdir = burst_home / "local" / job.id
        assert "clears its work folder" in protected(job)
        assert protected(job).startswith(f"If this notebook dies, the job stops within {LEASE:g} s.\n")
    wait_until(lambda: (jobdir / "exit.json").exists() and not (jobdir / "work").exists(),
               "the agent to stop the job and remove work/", limit=LEASE + SLACK)
    wait_until(lambda: not processes_mentioning(str(jobdir)), "the agent to exit", limit=SLACK)
    assert exit_reason(jobdir) == "lease"
    assert (jobdir / "m" / "0" / "partial.txt").read_text() == "written before the client went silent"
    assert pulled((jobdir / "values.out.pkl").read_bytes())["answer"] == 42
    assert "wait" in protected(job) and "for burst cleanup" in protected(job)
    if provider != "local":
        assert len(markets.all[provider].running()) == 1  # left for reconciliation, which ends it now
    burst.cleanup()  # a stranded job: stopped, synced back, terminated, settled
    assert (tmp_path / "out" / "partial.txt").read_text() == "written before the client went silent"
    assert all(cloud.running() == [] for cloud in markets.all.values())
    if provider == "local":
        assert not jobdir.exists()


# -- the agent's own deadline -------------------------------------------------------------------------------------


def test_the_agents_own_deadline_ends_the_instance_like_a_lapse(markets: Markets, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The client stops a job at its maximum duration; the agent's deadline, a minute later, means it could not.
    The agent runs here (the local runner) in place of the instance, with the instance's injected variables."""
    base = os.environ["VAST_URL"]  # the fake Vast, as the markets fixture set it
    reply = httpx.put(f"{base}/api/v0/asks/4102/", json={"client_id": "me", "image": "img", "disk": 10, "label": "t"},
                      headers={"Authorization": f"Bearer {markets.vast.api_key}"}).json()
    iid, key = reply["new_contract"], reply["instance_api_key"]
    monkeypatch.setenv("CONTAINER_ID", str(iid))
    monkeypatch.setenv("CONTAINER_API_KEY", key)
    recipe = VastProvider(api_key="never-sent", base_url=base).self_destruct()
    jobdir = tmp_path / "deadline-0a1b2c3d"
    client = Connections().agent(Endpoint(), sys.executable, str(jobdir))
    manifest = {"job_id": jobdir.name, "tag": "t", "mounts": [], "pull": [], "command": None, "lease_seconds": 600,
                "deadline_seconds": 1, "require_gpu": None, "gpus": 0, "self_destruct": recipe.to_json(),
                "lapse_upload": None}
    stream = client.start(manifest, lambda f: write_bundle(f, [], cell="import time\ntime.sleep(60)\n", pushed={},
                                                           compress=False))
    try:
        for _ in stream.records():
            pass
        assert stream.exit is not None and stream.exit["reason"] == "deadline"
        wait_until(lambda: markets.vast.instance(iid).destroyed, "the agent to destroy the instance",
                   limit=SLACK)
        assert markets.vast.instance(iid).destroyed_by == "scoped"
        client.release()  # the front command, waiting for a destroy, ends with its channel
        wait_until(lambda: not processes_mentioning(str(jobdir)), "the agent to exit", limit=SLACK)
        assert "ran past its hard maximum duration" in (jobdir / "agent.log").read_text()
    finally:
        client.destroy()


# -- small parts ----------------------------------------------------------------------------------------------------


def test_the_scoped_key_is_read_from_pid_1_when_the_session_lacks_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On Vast the container's variables live in PID 1's environment; SSH sessions do not inherit them."""
    monkeypatch.delenv("CONTAINER_API_KEY", raising=False)
    environ = tmp_path / "environ"
    environ.write_bytes(b"PATH=/usr/bin\0CONTAINER_ID=7835610\0CONTAINER_API_KEY=scoped-abc\0")
    assert agent._instance_env("CONTAINER_API_KEY", str(environ)) == "scoped-abc"
    assert agent._instance_env("CONTAINER_ID_NOT_THERE", str(environ)) is None
    monkeypatch.setenv("CONTAINER_API_KEY", "from-the-session")
    assert agent._instance_env("CONTAINER_API_KEY", str(environ)) == "from-the-session"


def test_the_lapse_upload_url_is_for_one_object_and_lives_at_most_seven_days(aws_env: str,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    sink = open_sink("s3://bucket/runs", job_id="job-0a1b2c3d")
    url = sink.presigned_put(agent.LAPSE_ARCHIVE, expires_seconds=30 * 86400)
    assert url is not None and "/bucket/runs/job-0a1b2c3d/lapse-results.tar?" in url
    assert "X-Amz-Expires=604800" in url and "X-Amz-Signature=" in url  # SigV4's longest
    assert open_sink(str(tmp_path / "runs")).presigned_put(agent.LAPSE_ARCHIVE, expires_seconds=60) is None


def test_the_job_view_says_it_in_one_line_with_the_layers_on_demand_escaped() -> None:
    view = JobView(job_id="j1", name="n", max_cost_usd=None, clock=lambda: 0.0, kernel_present=lambda: False)
    line = "If this notebook dies, the machine shuts itself down <b>within 10 min</b>."
    text = "job's own finally · agent lease 600 s → ends the instance <script>x</script>"
    event = JobEvent(type=EventType.PROTECTED, job_id="j1", message=line, text=text)
    view.handle(JobEvent(type=EventType.PROVISIONED, job_id="j1", provider="vast"))
    view.handle(event)
    assert view.state.status == "provisioned"  # a side note, not a phase
    assert view.text_line(event) == line  # a terminal prints the line; `burst show --events` has the rest
    html = view.snapshot_html()
    assert "<details" in html and "&lt;b&gt;within 10 min&lt;/b&gt;" in html
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>" not in html and "<b>within" not in html


def test_a_reaper_attaches_past_the_last_whole_line_of_the_log(tmp_path: Path) -> None:
    """``status`` tells a reaper where the log's whole lines end, so it replays no past output (a half-written
    last line is left for the stream to deliver whole)."""
    log = tmp_path / "events.jsonl"
    assert agent._log_end(str(log)) == 0  # no log yet
    log.write_bytes(b'{"k":"out","d":"a"}\n{"k":"out","d":"b"}\n{"k":"ou')
    assert agent._log_end(str(log)) == len(b'{"k":"out","d":"a"}\n{"k":"out","d":"b"}\n')
    log.write_bytes(b'{"k":"out","d":"' + b"x" * (3 * agent._MAX_RECORD) + b'"}')  # no newline in reach
    assert agent._log_end(str(log)) == 0
