"""A machine kept across cells (%burst up) on the real local provider and agent: names persist from cell to cell in
one Python process, a Ctrl-C keeps the machine, a dead process is said and replaced, the machine's money covers
every cell (the ledger shows the machine and each cell's share), mounts reach it once and then only as they
change, and it goes down (by %burst down, its idle limit or its cap) leaving nothing behind."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path

import pytest
from burst_checks import ledger_rows, live_instances, local_jobdirs, open_reservations, wait_until
from marketplaces import GPU, Markets

import burst_jupyter as burst
from burst_jupyter import ConfigError, EventType, JobSpec, JobStatus, RemoteError
from burst_jupyter.session import Session

pytestmark = pytest.mark.timeout(90)


def cell(source: str, **fields: object) -> JobSpec:
    return JobSpec(cell=source, **fields)  # type: ignore[arg-type]


def run(source: str, **fields: object) -> burst.JobResult:
    """A cell on whichever machine is up, to its end (its error raised)."""
    return burst.run(cell(source, **fields), namespace={})


@pytest.fixture
def session(burst_home: Path) -> Session:
    return Session.current()


def test_two_cells_share_names_in_one_process_and_down_settles_the_machine_with_each_cells_share(
        session: Session, burst_home: Path) -> None:
    machine = burst.up(name="box", max_cost_usd="1", rate_usd_per_hour="3.6", idle=5)
    assert [m.name for m in session.live_machines()] == ["box"]
    [row] = live_instances(burst_home)  # the machine holds the one instance; its cells hold none
    assert row.job_id == machine.job.id
    first = run("import os\nmodel = {'w': 41}\npid = os.getpid()\nprint('loaded')", pull=["pid"])
    second = run("model['w'] += 1\nprint(model['w'], os.getpid() == pid)\nmodel['w']", pull=["pid"])
    assert first.values["pid"] == second.values["pid"]  # the same remote process
    assert repr(second.result) == "42"
    assert [c.status for c in machine.cells if c.done()] == [first.status, second.status] == [JobStatus.COMPLETED] * 2
    assert ledger_rows(burst_home) == []  # the machine's row is written when it is down; the cells are shares
    assert "box" in repr(burst.machines()) and "up" in repr(burst.machines())
    [down] = burst.down("box")
    assert down.status is JobStatus.COMPLETED and down.error is None
    [row] = ledger_rows(burst_home)
    assert (row.job_id, row.name, row.status) == (machine.job.id, "box", "completed")
    cells = session.budget.cells(machine.job.id)
    assert [c.cell_job_id for c in cells] == [first.job_id, second.job_id]
    assert all(Decimal(0) < c.share_usd <= row.actual_usd for c in cells)
    assert sum(c.share_usd for c in cells) <= row.actual_usd  # shares of the row, never billed again
    assert cells[1].output_bytes >= len("42 True\n")
    text = repr(session.budget.table())
    assert f"cell {first.job_id}" in text and f"cell {second.job_id}" in text
    from burst_jupyter.cli_json import dumps, ledger_json

    shown = json.loads(dumps(ledger_json(session.budget.table())))["cells"]
    assert [(c["machine_job_id"], c["cell_job_id"]) for c in shown] == [(row.job_id, first.job_id),
                                                                         (row.job_id, second.job_id)]
    assert local_jobdirs(burst_home) == [] and live_instances(burst_home) == [] and open_reservations(burst_home) == []


def test_ctrl_c_interrupts_the_cell_and_keeps_the_machine_with_its_names(session: Session, burst_home: Path) -> None:
    machine = burst.up(max_cost_usd="1", rate_usd_per_hour="1")
    run("x = 7")
    job = burst.submit(cell("import time\nprint('looping', flush=True)\nwhile True: time.sleep(0.05)"),
                       namespace={})
    wait_until(lambda: any("looping" in (e.text or "") for e in job.events), "the loop to start")
    job.cancel()
    result = job.wait(30)
    assert result.status is JobStatus.CANCELLED
    assert "machine" in str(job.interrupted(result)) and "kept" in str(job.interrupted(result))
    assert machine.up
    assert repr(run("x * 6").result) == "42"  # the state survived the interrupt
    burst.down()
    assert live_instances(burst_home) == []


def test_a_killed_remote_process_fails_its_cell_saying_state_is_lost_and_the_next_cell_gets_a_fresh_one(
        session: Session, burst_home: Path) -> None:
    machine = burst.up(max_cost_usd="1")
    run("import os\nbefore = os.getpid()", pull=["before"])
    with pytest.raises(RemoteError) as died:
        run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert "lost" in str(died.value) and "signal 9" in str(died.value)
    after = run("import os\nprint('before' in globals())\npid = os.getpid()", pull=["pid"])
    assert machine.up
    assert stdout_of(after) == "False\n"
    burst.down()


def after_events(result: burst.JobResult) -> list[burst.JobEvent]:
    return Session.current().jobs[result.job_id].events


def stdout_of(result: burst.JobResult) -> str:
    return "".join(e.text or "" for e in after_events(result) if e.type is EventType.OUTPUT and e.stream == "stdout")


def test_the_idle_limit_brings_the_machine_down_and_settles_it(session: Session, burst_home: Path) -> None:
    machine = burst.up(max_cost_usd="1", idle=0.05)  # three seconds
    run("print('one cell')")
    said = "".join(e.text or "" for e in machine.job.events if e.type is EventType.OUTPUT)
    assert "is up; idle: down at " in said and "completed in" in said and said.count("unless a cell runs") == 2
    result = machine.job.wait(30)
    assert result.status is JobStatus.COMPLETED
    [row] = ledger_rows(burst_home)
    assert row.job_id == machine.job.id
    assert local_jobdirs(burst_home) == [] and open_reservations(burst_home) == []


def test_cell_mounts_reach_the_machine_once_then_only_as_they_change(session: Session, work: Path,
                                                                    burst_home: Path) -> None:
    data = work / "data"
    data.mkdir()
    (data / "big.bin").write_bytes(b"x" * 200_000)
    (data / "small.txt").write_text("v1")
    (data / "gone.txt").write_text("bye")
    out = work / "out"
    machine = burst.up(max_cost_usd="1")
    mounts = [f"{data}:data:ro", f"{out}:out:rw"]
    show = ("import os\nprint(sorted(os.listdir('data')), open('data/small.txt').read())\n"
            "open('out/n.txt', 'a').write('+')")
    run(show, mount_local=mounts)
    [store] = [k for k in machine.sent if "big.bin" in machine.sent[k]]
    big_sent = machine.sent[store]["big.bin"]
    (data / "small.txt").write_text("v2")
    (data / "gone.txt").unlink()
    second = run(show, mount_local=mounts)
    assert "['big.bin', 'small.txt'] v2" in stdout_of(second)  # the change is there, the deletion too
    assert machine.sent[store]["big.bin"] == big_sent  # not sent again
    assert (out / "n.txt").read_text() == "++"  # each cell's rw changes came back after it
    burst.down()


def test_cells_route_to_the_machine_only_without_placement_options(session: Session, burst_home: Path) -> None:
    burst.up(name="a", max_cost_usd="1")
    burst.up(name="b", max_cost_usd="1")
    with pytest.raises(ConfigError, match="--on NAME"):
        burst.submit(cell("1"), namespace={})
    with pytest.raises(ConfigError, match="no machine of that name"):
        burst.submit(cell("1", on_machine="c"), namespace={})
    with pytest.raises(ConfigError, match="--max-cost is the machine's"):
        burst.submit(cell("1", on_machine="a", max_cost_usd="2"), namespace={})
    on_b = run("import os\nos.environ['BURST_JOBDIR']", on_machine="b")
    assert "/c/" in repr(on_b.result)
    own = run("print('alone')", provider="local")  # placement options: a machine of its own
    assert own.job_id in {r.job_id for r in ledger_rows(burst_home)}
    burst.down()
    assert live_instances(burst_home) == [] and session.live_machines() == []


def test_the_agent_holds_the_machines_cap_across_cells_on_its_own(session: Session, burst_home: Path,
                                                                   tmp_path: Path) -> None:
    # 36 $/h is a cent a second: a cap of 15 cents lasts about 15 seconds of machine time, however many cells.
    machine = burst.up(max_cost_usd="0.15", rate_usd_per_hour="36", lease_seconds=600)
    run("x = 1")
    jobdir = Path(machine.jobdir)
    manifest = json.loads((jobdir / "job.json").read_text())
    assert (manifest["cap_usd"], manifest["rate_usd_per_hour"]) == ("0.15", "36")
    job = burst.submit(cell("import time\nwhile True: time.sleep(0.1)"), namespace={})
    result = job.wait(30)
    assert result.status is JobStatus.BUDGET_KILLED
    down = machine.job.wait(30)
    assert down.status is JobStatus.BUDGET_KILLED
    [row] = ledger_rows(burst_home)
    assert row.actual_usd is not None and row.actual_usd <= Decimal("0.15")


def test_kernel_exit_brings_every_machine_down(burst_home: Path) -> None:
    from burst_jupyter.exit_hooks import hand_off

    session = Session.current()
    machine = burst.up(max_cost_usd="1")
    run("x = 1")
    handed = hand_off(session, "test exit")
    assert handed == [machine.job.id]
    wait_until(lambda: local_jobdirs(burst_home) == [] and not live_instances(burst_home), "the reaper", limit=60)


def test_on_a_marketplace_two_cells_share_one_machine_with_one_create(markets: Markets, burst_home: Path) -> None:
    Session.reset_current()  # the fakes' accounts are in this test's environment
    burst.up(provider="vast", gpu_model=GPU["vast"], max_cost_usd="1")
    assert markets.creates() == 1
    run("state = [1]")
    second = run("state.append(2)\nlen(state)")
    assert repr(second.result) == "2"
    assert markets.creates() == 1  # the second cell rented nothing
    assert len(markets.vast.running()) == 1
    burst.down()
    assert markets.vast.running() == []
    [row] = ledger_rows(burst_home)
    assert (row.provider, row.status) == ("vast", "completed")
    assert len(Session.current().budget.cells(row.job_id)) == 2


def test_an_upload_to_a_kept_store_sends_only_what_changed_and_lists_what_is_there(tmp_path: Path) -> None:
    import io
    import tarfile

    from burst_jupyter.spec import parse_mount
    from burst_jupyter.sync import plan_mounts, write_bundle

    data = tmp_path / "data"
    data.mkdir()
    (data / "same.txt").write_text("same")
    (data / "edited.txt").write_text("v1")

    def upload(sent: dict[str, list[object]] | None) -> tuple[list[str], dict[str, object], dict[str, list[object]]]:
        [plan] = plan_mounts([parse_mount(f"{data}:data:ro")])
        plan.keep, plan.sent = "0123456789abcdef", sent
        entry = plan.manifest()
        buf = io.BytesIO()
        write_bundle(buf, [plan], cell="1", pushed={}, compress=False)
        with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
            names = sorted(n for n in tar.getnames() if n.startswith("m/0/") and tar.getmember(n).isfile())
        assert plan.uploaded is not None
        return names, entry, plan.uploaded

    names, entry, first = upload(None)
    assert names == ["m/0/edited.txt", "m/0/same.txt"]
    assert (entry["keep"], entry["present"]) == ("0123456789abcdef", ["edited.txt", "same.txt"])
    (data / "edited.txt").write_text("v2, longer")
    (data / "new.txt").write_text("new")
    names, entry, second = upload(first)
    assert names == ["m/0/edited.txt", "m/0/new.txt"]  # same.txt is on the machine as it is here
    assert second["same.txt"] == first["same.txt"] and second["edited.txt"] != first["edited.txt"]
    (data / "same.txt").unlink()
    names, entry, _ = upload(second)
    assert names == [] and entry["present"] == ["edited.txt", "new.txt"]  # the deletion travels as the listing


def test_the_ledger_shows_each_cell_under_its_machine_with_its_share_and_sums_only_the_machine(
        session: Session) -> None:
    import datetime as dt

    from burst_jupyter.budget.cells import CellRow

    budget, t0 = session.budget, dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.timezone.utc)
    budget.reserve(job_id="box-1", name="box", provider="vast", gpu="RTX_4090", amount=Decimal("1"))
    for i, share in enumerate(("0.01", "0.02")):
        start = t0 + dt.timedelta(minutes=i)
        budget.record_cell(CellRow(machine_job_id="box-1", cell_job_id=f"c-{i}", name="job",
                                   started_at=start, ended_at=start + dt.timedelta(seconds=30),
                                   output_bytes=1500 * (i + 1), share_usd=Decimal(share), status="completed"))
    budget.record_cell(CellRow(machine_job_id="box-1", cell_job_id="c-0", name="again", started_at=t0, ended_at=t0,
                               output_bytes=0, share_usd=Decimal("9"), status="failed"))  # once per cell
    budget.settle("box-1", provider="vast", instance_id="7", gpu="RTX_4090", rate_usd_per_hour=Decimal("0.36"),
                  started_at=t0, ended_at=t0 + dt.timedelta(minutes=10), actual_usd=Decimal("0.06"),
                  status="completed", name="box")
    table = budget.table(tz=dt.timezone.utc)
    assert table.total == Decimal("0.06")  # the shares are parts of the machine's row
    text = repr(table)
    lines = text.splitlines()
    machine = next(i for i, line in enumerate(lines) if "box-1" in line)
    assert "cell c-0" in lines[machine + 1] and "1.5 KB out" in lines[machine + 1] and "($0.01)" in lines[machine + 1]
    assert "cell c-1" in lines[machine + 2] and "($0.02)" in lines[machine + 2]
    assert "cell c-0" in table._repr_html_()


def test_the_machines_view_shows_its_gpus_memory_and_use(session: Session, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"  # what nvidia-smi prints for this query on one RTX 4090 (MiB, MiB, %)
    smi.write_text("#!/bin/sh\necho '3174, 24564, 37'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    machine = burst.up(max_cost_usd="1")
    wait_until(lambda: any(e.type is EventType.PROGRESS and e.message == "GPU 3.1/24 GB 37%"
                           for e in machine.job.events), "the machine's GPU line")
    burst.down()


def test_a_dry_run_of_a_cell_a_kept_machine_would_run_names_that_machine(session: Session) -> None:
    burst.up(name="box", max_cost_usd="1")
    said = repr(session.dry_run(cell("print(1)")))
    assert said.startswith("would run on kept machine box (local") and "nothing would be rented" in said
    burst.down()
