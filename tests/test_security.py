"""Security, end to end (issue 4): secrets stay home, per-job keys die with their instance, host keys are pinned,
results cannot escape their mount, and remote text is shown inert.

- Canaries: each marketplace fake accepts a unique canary API key, and the S3 result sink (a real moto server)
  gets canary AWS credentials. Real ``%%burst`` jobs run on each provider (one completes, one is cancelled, one
  fails, one is handed to the reaper process); while each runs, the test reads the command line and environment
  of every process on the fake machine and every file on it, and afterwards greps everything a secret could
  have reached.
- SSH keys: 0600 in a 0700 folder while the job runs, gone once the instance is confirmed terminated (by the
  job, or by the reaper).
- Host keys: a different sshd answering on a rented instance's address mid-job is refused; a new instance that
  reuses an old instance's ip:port is accepted (each instance has its own known_hosts).
- Results: hand-made hostile tar streams fed to ``receive_results``, and a cell that links to /etc/passwd.
- Inert HTML: remote output, offer locations, ledger names and messages, budget labels, in every view.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import secrets
import signal
import socket
import stat
import tarfile
from dataclasses import dataclass, field
from decimal import Decimal
from html import escape
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, last_job, ok, run_cell, state_row, wait_until, write
from marketplaces import Markets
from sshd import SSHServer, kill_connections, start_sshd

# The real moto S3 server of test_sinks.py, reused (module-scoped server, a bucket per test).
from test_sinks import Store, aws_env, moto_endpoint, store  # noqa: F401

import burst_jupyter as burst
from burst_jupyter.errors import HostKeyError, RemoteError, SyncError
from burst_jupyter.events import EventType, JobEvent
from burst_jupyter.job import JobStatus
from burst_jupyter.sinks import FolderSink
from burst_jupyter.spec import Mount
from burst_jupyter.sync import MountPlan, write_bundle
from burst_jupyter.sync_back import receive_results
from burst_jupyter.widgets import JobView

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

# Remote text that would run or break the page if a view put it into HTML as it stands.
PAYLOADS = ("<script>alert('x')</script>", "<img src=x onerror=alert(1)>", "</pre></code></td></table><b>bold")
ANSI = "\x1b[31mred\x1b[0m\x1b]0;title\x07"  # colours and a terminal-title escape
NAME = "<svg/onload=alert(1)>"  # a job name is one word on the %%burst line


def assert_inert(html: str, *payloads: str) -> None:
    """Each payload is in ``html`` as text (escaped), never as markup."""
    for payload in payloads:
        assert payload not in html, f"{payload!r} is live HTML in {html!r}"
        assert escape(payload) in html, f"{payload!r} is not shown at all in {html!r}"


def widget_html(widget: Any) -> str:
    """Every HTML trait value of a widget tree, joined."""
    import ipywidgets

    found = [widget.value] if isinstance(widget, ipywidgets.HTML) else []
    return "".join(found + [widget_html(child) for child in getattr(widget, "children", ())])


# -- canary secrets ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Canaries:
    api: dict[str, str]  # provider -> its API key
    aws_key_id: str
    aws_secret: str
    aws_token: str

    def never(self) -> dict[str, str]:
        """What must appear nowhere but where it is used: the provider keys and the AWS secret key."""
        return {**{f"{name} API key": key for name, key in self.api.items()}, "AWS_SECRET_ACCESS_KEY": self.aws_secret}

    def presigned_only(self) -> dict[str, bytes]:
        """What may appear only as a query parameter of a presigned URL (the agent's lapse upload), with that
        parameter. The URL names the key it was signed with (``X-Amz-Credential=AKID/...``) and, under temporary
        credentials, carries their session token (``X-Amz-Security-Token``), as AWS designed presigned URLs to be
        handed to others: neither signs anything without the secret key, which appears nowhere, so the URL grants
        that one PUT until it expires and nothing more. Anywhere else (an environment, a log) they are refused."""
        return {self.aws_key_id: b"X-Amz-Credential=", self.aws_token: b"X-Amz-Security-Token="}


@pytest.fixture
def canaries() -> Canaries:
    def make(what: str) -> str:
        return f"canary{what}{secrets.token_hex(12)}"

    return Canaries({name: make(name) for name in ("vast", "runpod", "thunder", "lambda")}, make("AKID"),
                    make("SECRET"), make("TOKEN"))


@pytest.fixture
def market_keys(canaries: Canaries) -> dict[str, str]:
    return dict(canaries.api)


@pytest.fixture
def canary_store(store: Store, canaries: Canaries, monkeypatch: pytest.MonkeyPatch) -> Store:  # noqa: F811
    """The moto bucket, with the canary AWS credentials in the environment (moto takes any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", canaries.aws_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canaries.aws_secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", canaries.aws_token)
    return store


def machine_snapshot(machine: Any) -> dict[str, bytes]:
    """What the instance holds: every process's command line (as ``ps`` shows it) and environment, and every
    file on the machine (its home with the job directory, the sshd's folder)."""
    seen: dict[str, bytes] = {}
    for pid in machine.processes():
        for part in ("cmdline", "environ"):
            with contextlib.suppress(OSError):  # it may have ended meanwhile
                seen[f"pid {pid} {part}"] = Path(f"/proc/{pid}/{part}").read_bytes()
    seen.update(tree_snapshot(machine.root))
    return seen


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (links not followed): path -> content."""
    seen = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(path.lstat().st_mode):
                    seen[str(path)] = path.read_bytes()
    return seen


def requests_snapshot(markets: Markets, canaries: Canaries) -> dict[str, bytes]:
    """Every request each fake received: method, URL path, query, body and headers, except an Authorization header
    that holds that provider's own key, where it belongs (another key there, e.g. the one a Vast instance gets
    scoped to itself, is grepped like everything else)."""
    seen: dict[str, bytes] = {}
    for name, cloud in markets.all.items():
        own = ("authorization", f"Bearer {canaries.api[name]}")
        for i, r in enumerate(cloud.requests):
            headers = {k: v for k, v in r.headers.items() if (k.lower(), v) != own}
            seen[f"{name} request {i} {r.method} {r.path}"] = json.dumps(
                [r.method, r.path, r.body, headers], default=str).encode()
    for i, query in enumerate(markets.vast.queries):
        seen[f"vast query {i}"] = json.dumps(query).encode()
    return seen


def strays(blob: bytes, value: str, parameter: bytes) -> int:
    """Occurrences of ``value`` in ``blob`` other than as ``parameter`` of a URL."""
    return sum(1 for m in re.finditer(re.escape(value.encode()), blob) if not blob[:m.start()].endswith(parameter))


@dataclass
class Watch:
    """Acts once when the cell says it is ready: snapshots the machine and the burst home, checks the key files,
    then ends the job the way the test asks: lets the cell go on, cancels it, or hands it to the reaper."""

    markets: Markets
    provider: str
    home: Path
    go: Path
    ending: str
    seen: dict[str, bytes] = field(default_factory=dict)
    key_modes: dict[str, int] = field(default_factory=dict)
    done: bool = False
    _text: str = ""

    def __call__(self, stream: str, text: str) -> None:
        self._text += text
        if self.done or "ready to be watched" not in self._text:
            return
        self.done = True
        (machine,) = [m for m in self.markets.all[self.provider].machines.all if not m.destroyed]
        self.seen.update(machine_snapshot(machine))
        self.seen.update(tree_snapshot(self.home))
        job = last_job()
        keys = self.home / "keys"
        self.key_modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [keys, *keys.iterdir()]}
        self.key_modes["job"] = self.key_modes.get(job.id, -1)
        if self.ending == "is cancelled":
            job.cancel()
        elif self.ending == "is handed to the reaper":
            burst.shutdown()  # what the exit hooks do: a detached reaper process syncs, terminates, settles
        else:
            self.go.touch()


CELL = """
    import os, sys, time
    burst.progress(50, {progress!r})
    open("out/result.txt", "w").write("made on the instance")
    print("environment:", sorted(os.environ.items()))  # all of it reaches the notebook output, which is grepped
    print("argv:", sys.argv, {payload!r})
    print("ready to be watched", flush=True)
    deadline = time.time() + 60
    while not os.path.exists({go!r}) and time.time() < deadline:
        time.sleep(0.05)
    if {fail!r}:
        raise ValueError({payload!r})
    answer = 42
"""

#: (provider, GPU, how the job ends): a job on each marketplace, ending each way a job can.
JOBS = [("vast", "RTX_4090", "completes"), ("runpod", "RTX_4090", "is cancelled"), ("thunder", "H100", "fails"),
        ("vast", "RTX_4090", "is handed to the reaper"), ("lambda", "H100", "completes")]


@pytest.mark.parametrize(("provider", "gpu", "ending"), JOBS,
                         ids=[e.split()[-1] + ("-on-lambda" if p == "lambda" else "") for p, _, e in JOBS])
def test_no_secret_reaches_anything_a_job_leaves(ip: Any, markets: Markets, canaries: Canaries,
                                                 canary_store: Store, burst_home: Path, tmp_path: Path,
                                                 provider: str, gpu: str, ending: str) -> None:
    from IPython.utils.capture import capture_output

    go = tmp_path / "go"
    watch = Watch(markets, provider, burst_home, go, ending)
    source = cell(f"--provider {provider} --gpu {gpu} --max-cost 1 --mount ./out:out:rw --pull answer "
                  f"--sink s3://{canary_store.bucket}/runs",
                  CELL.format(progress=PAYLOADS[1], payload=PAYLOADS[0], go=str(go), fail=ending == "fails"))
    with capture_output(stdout=False, stderr=False) as displayed:
        result, streams = run_cell(ip, source, on_write=watch)
    job = last_job()
    assert watch.done, streams.text(ours=True)
    status = job.result().status
    if ending == "is handed to the reaper":
        wait_until(lambda: (row := state_row(burst_home, job.id)) is not None and row.state == "terminated",
                   "the reaper terminated the instance")
        assert job.id in "".join(p.read_text() for p in (burst_home / "logs").glob("reaper-*.log"))

    # The job really used every credential: each fake saw its own key, and the sink stored the result.
    assert any(r.headers.get("authorization") == f"Bearer {canaries.api[provider]}"
               for r in markets.all[provider].requests)
    assert canary_store.objects() == {f"runs/{job.id}/out/result.txt": b"made on the instance"}
    if ending == "completes":
        ok(result, streams)
        assert ip.user_ns["answer"] == 42
    elif ending == "fails":
        assert status is JobStatus.FAILED and isinstance(result.error_in_exec, RemoteError)
    else:  # cancelled, or handed off (the kernel's side of the job ends cancelled either way)
        assert status is JobStatus.CANCELLED

    # Per-job key: 0600 in a 0700 folder while the job ran, gone with its instance.
    assert watch.key_modes["keys"] == 0o700 and watch.key_modes["job"] == 0o600, watch.key_modes
    assert not [p.name for p in (burst_home / "keys").iterdir() if p.name.startswith(job.id)]

    error = result.error_in_exec
    shown = "\n".join([
        streams.text(ours=True), repr(result.result), str(error),
        "\n".join(error._render_traceback_()) if isinstance(error, RemoteError) else "",
        *(json.dumps(o.data, default=str) for o in displayed.outputs)])
    everything = {
        **watch.seen,  # the instance while it ran (processes, files) and the burst home then
        **tree_snapshot(burst_home),  # ledger and state SQLite files, logs, job logs, the keys folder, after
        "job events": json.dumps([e.to_json() for e in job.events]).encode(),
        "notebook output": shown.encode(),
        **requests_snapshot(markets, canaries),
    }
    assert any("job.json" in where for where in watch.seen), "the job directory was not seen on the machine"
    assert any("environ" in where for where in watch.seen), "no process of the machine was seen"
    leaks = [(what, where) for what, secret in canaries.never().items() for where, blob in everything.items()
             if secret.encode() in blob]
    assert leaks == []
    misplaced = [where for value, parameter in canaries.presigned_only().items()
                 for where, blob in everything.items() if strays(blob, value, parameter)]
    assert misplaced == []
    if ending == "fails":
        # The remote output, progress message and error, as the notebook's job view shows them.
        view = JobView(job_id=job.id, name=job.spec.name, max_cost_usd=None, kernel_present=lambda: True)
        for event in job.events:
            view.handle(event)
        assert_inert(view.snapshot_html(), PAYLOADS[0], PAYLOADS[1])


# -- per-job SSH keys and pinned host keys --------------------------------------------------------------------


def wait_port_closed(port: int) -> None:
    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        return False

    wait_until(refused, f"port {port} closed")


def test_a_different_sshd_on_the_instance_address_is_refused(ip: Any, markets: Markets, burst_home: Path,
                                                              tmp_path: Path) -> None:
    """Mid-job the instance's sshd is replaced by another one, with another host key, on the same ip:port (a
    man in the middle, or the address handed to someone else): the lifecycle's reconnect must refuse it."""
    go = tmp_path / "go"
    result, streams = run_cell(ip, cell("--background --provider vast --gpu RTX_4090 --max-cost 1", f"""
        import os, time
        print("ready to be swapped", flush=True)
        deadline = time.time() + 60
        while not os.path.exists({str(go)!r}) and time.time() < deadline:
            time.sleep(0.05)
    """))
    ok(result, streams)
    job = result.result
    wait_until(lambda: any("ready to be swapped" in (e.text or "") for e in job.events), "the cell started")
    (machine,) = markets.vast.machines.all
    old = machine.server
    assert old is not None
    pinned = burst_home / "keys" / f"{job.id}.known_hosts"
    assert old.host_key_pub in pinned.read_text()  # pinned at first contact
    with contextlib.ExitStack() as stack:
        kill_connections(old)  # the job's connection drops: the lifecycle reconnects to the same address
        os.kill(old.pid, signal.SIGTERM)
        wait_port_closed(old.port)
        impostor = stack.enter_context(start_sshd(tmp_path / "impostor", port=old.port, home=machine.home))
        with (tmp_path / "impostor" / "authorized_keys").open("a") as keys:
            keys.writelines(f"{k}\n" for k in machine.authorized)  # it would even let the job's key in
        try:
            done = job.wait(timeout=20)
        except TimeoutError:
            job.cancel()
            job.wait(timeout=60)
            pytest.fail("a changed host key was retried until the reconnect timeout instead of failing the job")
        assert impostor.connections_seen() > 1, "the impostor was never asked"  # one is start_sshd's own probe
        assert "Accepted publickey" not in impostor.log(), "logged in to the impostor"
    assert done.status is JobStatus.FAILED
    assert isinstance(done.error, HostKeyError) and "has CHANGED" in str(done.error), repr(done.error)
    assert markets.vast.instance(job_instance(job)).destroyed  # the instance was still terminated
    assert not list((burst_home / "keys").glob(f"{job.id}*"))


def job_instance(job: Any) -> str:
    return next(str(e.instance_id) for e in job.events if e.type is EventType.PROVISIONED)


def test_a_new_instance_on_an_old_instance_address_is_accepted(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Marketplaces hand an ip:port to the next renter: each instance pins its host key in a known_hosts of its
    own (Endpoint.known_hosts), so the next instance there is a new host, not a "changed" one."""
    from burst_jupyter.providers.base import Endpoint
    from burst_jupyter.ssh import SSHRunner

    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def endpoint(server: SSHServer, job: str) -> Endpoint:
        return Endpoint(host=server.host, port=server.port, user=server.user, key_path=str(server.client_key_path),
                        trust_on_first_use=True, known_hosts=str(tmp_path / f"{job}.known_hosts"))

    with start_sshd(tmp_path / "first") as first:
        SSHRunner.connect(endpoint(first, "job-1")).close()
    wait_port_closed(first.port)
    with start_sshd(tmp_path / "second", port=first.port) as second:
        runner = SSHRunner.connect(endpoint(second, "job-2"))
        runner.close()
        # The first instance's own pin would refuse this sshd: the two instances were told apart by their files.
        with pytest.raises(HostKeyError, match="has CHANGED"):
            SSHRunner.connect(dataclasses.replace(endpoint(second, "job-2"), known_hosts=str(
                tmp_path / "job-1.known_hosts")))
    assert second.host_key_pub in (tmp_path / "job-2.known_hosts").read_text()
    assert not (tmp_path / "home" / ".ssh").exists()  # the user's own known_hosts is never read or written


# -- results cannot escape their mount --------------------------------------------------------------------------


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "",
           mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode = kind, link, len(data), mode
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info, data


def results_tar(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buffer.seek(0)
    return buffer


@dataclass
class Landing:
    """An rw folder mount (m/0), a read-only mount (m/1), an rw file mount (m/2), and a folder beside them that
    nothing may ever reach."""

    root: Path

    def __post_init__(self) -> None:
        for name in ("out", "ro", "outside"):
            (self.root / name).mkdir(parents=True)
        write(self.root / "single.txt", "before")
        self.plans = [MountPlan(0, Mount(local=self.out, remote="out", mode="rw"), self.out, False),
                      MountPlan(1, Mount(local=self.root / "ro", remote="ro"), self.root / "ro", False),
                      MountPlan(2, Mount(local=self.root / "single.txt", remote="single.txt", mode="rw"),
                                self.root / "single.txt", True)]
        write_bundle(io.BytesIO(), self.plans, cell=None, pushed={}, compress=False)  # records what went up

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def outside(self) -> Path:
        return self.root / "outside"

    def links_out(self) -> list[str]:
        """Links under the rw mount whose target lies outside it."""
        return [str(p) for p in self.out.rglob("*") if p.is_symlink()
                and not Path(os.path.realpath(p)).is_relative_to(self.out)]


@pytest.fixture
def landing(tmp_path: Path) -> Landing:
    return Landing(tmp_path / "landing")


GOOD = member("m/0/good.txt", data=b"kept")
HOSTILE = {
    "dot-dot": [member("m/0/../outside/evil.txt", data=b"x")],
    "deep-dot-dot": [member("m/0/sub/../../outside/evil.txt", data=b"x")],
    "absolute": [member("{outside}/evil.txt", data=b"x")],
    "link-absolute": [member("m/0/passwd", tarfile.SYMTYPE, link="/etc/passwd")],
    "link-up": [member("m/0/up", tarfile.SYMTYPE, link="../outside")],
    "hardlink-absolute": [member("m/0/hard", tarfile.LNKTYPE, link="/etc/passwd")],
    "hardlink-up": [member("m/0/hard", tarfile.LNKTYPE, link="m/0/../outside/x")],
    "hardlink-escaping": [member("m/0/hard", tarfile.LNKTYPE, link="m/2/../../../outside/x")],
    "hardlink-unsent": [member("m/0/hard", tarfile.LNKTYPE, link="m/0/never-sent.txt")],
    "device": [member("m/0/disk", tarfile.CHRTYPE)],
    "fifo": [member("m/0/pipe", tarfile.FIFOTYPE)],
    "unexpected-name": [member("evil.txt", data=b"x")],
    "unknown-mount": [member("m/9/evil.txt", data=b"x")],
    "read-only-mount": [member("m/1/evil.txt", data=b"x")],
    "file-mount-sibling": [member("m/2/evil.txt", data=b"x")],
    "values-as-link": [member("values.out.pkl", tarfile.SYMTYPE, link="/etc/passwd")],
    # Each link points inside when made; re-pointing b makes a lead out (b -> sub/deep, a -> b/.., b -> .).
    "re-pointed-chain": [member("m/0/sub/deep", tarfile.DIRTYPE), member("m/0/b", tarfile.SYMTYPE, link="sub/deep"),
                         member("m/0/a", tarfile.SYMTYPE, link="b/.."), member("m/0/b", tarfile.SYMTYPE, link="."),
                         member("m/0/a/new/evil.txt", data=b"x")],
    # A link the user has in the local folder, pointing out: nothing is written through it.
    "through-local-link": [member("m/0/ext/new/evil.txt", data=b"x")],
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_results_are_refused_and_nothing_lands_outside(landing: Landing, tmp_path: Path, case: str) -> None:
    (landing.out / "ext").symlink_to(landing.outside)
    hostile = [(copy.copy(info), data) for info, data in HOSTILE[case]]
    for info, _ in hostile:
        info.name = info.name.format(outside=landing.outside)
    sink = FolderSink(tmp_path / "sink")
    with pytest.raises(SyncError, match="refused a result from the instance: ") as refused:
        receive_results(results_tar(GOOD, *hostile, member("m/0/after.txt", data=b"also kept")), landing.plans,
                        sink=sink)
    assert repr(hostile[-1][0].name) in str(refused.value)  # the one clear line names the path
    assert list(landing.outside.iterdir()) == [] and landing.links_out() == [str(landing.out / "ext")]  # the user's
    assert (landing.root / "single.txt").read_text() == "before"
    assert not (landing.root / "ro" / "evil.txt").exists() and not (landing.root / "evil.txt").exists()
    # Everything else still landed, locally and in the sink; nothing refused reached either.
    assert (landing.out / "good.txt").read_bytes() == b"kept" and (landing.out / "after.txt").exists()
    assert sorted(p.relative_to(sink.root).as_posix() for p in sink.root.rglob("*") if p.is_file()) == [
        "out/after.txt", "out/good.txt"]


def test_results_inside_their_mounts_land_whole(landing: Landing, tmp_path: Path) -> None:
    """The refusals above do not cost anything a cell really makes: folders, links inside, hardlinks (as copies),
    a file mount's file, the pulled values."""
    sink = FolderSink(tmp_path / "sink")
    got = receive_results(results_tar(
        member("m/0/a", tarfile.DIRTYPE), member("m/0/a/b.txt", data=b"bee"),
        member("m/0/a/up", tarfile.SYMTYPE, link="../top.txt"), member("m/0/top.txt", data=b"top"),
        member("m/0/a/same", tarfile.LNKTYPE, link="m/0/a/b.txt"), member("m/2/single.txt", data=b"after"),
        member("values.out.pkl", data=b"pickled")), landing.plans, sink=sink)
    assert got.values_blob == b"pickled" and got.notes == []
    assert (landing.out / "a" / "up").resolve() == landing.out / "top.txt"
    assert (landing.out / "a" / "same").read_bytes() == b"bee" and not (landing.out / "a" / "same").is_symlink()
    assert (landing.root / "single.txt").read_text() == "after"
    stored = {p.relative_to(sink.root).as_posix(): p.read_bytes() for p in sink.root.rglob("*") if p.is_file()}
    assert stored == {"out/a/b.txt": b"bee", "out/top.txt": b"top", "out/a/same": b"bee",
                      "single.txt/single.txt": b"after"}


def test_a_cell_linking_out_of_its_mount_keeps_its_results_but_not_the_link(ip: Any, tmp_path: Path,
                                                                            burst_home: Path) -> None:
    # The agent leaves such a link on the instance; a tampered agent that sends it anyway is refused by
    # receive_results (the hostile streams above).
    (tmp_path / "out").mkdir()
    result, streams = run_cell(ip, cell("--mount ./out:out:rw --pull answer", """
        import os
        open("out/ok.txt", "w").write("fine")
        os.symlink("/etc/passwd", "out/passwd")
        os.symlink("ok.txt", "out/inside")
        answer = 42
    """))
    ok(result, streams)
    assert not (tmp_path / "out" / "passwd").exists() and not (tmp_path / "out" / "passwd").is_symlink()
    assert (tmp_path / "out" / "inside").is_symlink() and (tmp_path / "out" / "inside").read_text() == "fine"
    assert (tmp_path / "out" / "ok.txt").read_text() == "fine"
    assert ip.user_ns["answer"] == 42


# -- remote text is inert in every view -------------------------------------------------------------------------


def test_remote_html_is_inert_in_the_job_view(dummy_comm: None) -> None:
    view = JobView(job_id="j-1", name=PAYLOADS[2], max_cost_usd=Decimal(1), kernel_present=lambda: True)
    events = [
        JobEvent(type=EventType.OFFER_SELECTED, job_id="j-1", provider="vast", message=PAYLOADS[1]),
        JobEvent(type=EventType.PROVISIONED, job_id="j-1", provider="vast", instance_id=PAYLOADS[1],
                 gpu=PAYLOADS[2], cost_per_hour_usd=Decimal("0.3")),
        JobEvent(type=EventType.STARTED, job_id="j-1"),
        JobEvent(type=EventType.PROGRESS, job_id="j-1", percent=40, message=PAYLOADS[1] + ANSI),
        JobEvent(type=EventType.BUDGET_WARNING, job_id="j-1", message=PAYLOADS[2]),
        JobEvent(type=EventType.OUTPUT, job_id="j-1", stream="stdout", text=f"{PAYLOADS[0]} {ANSI}\n"),
    ]
    for event in events:
        view.handle(event)
    live = widget_html(view.widget)
    assert_inert(live, PAYLOADS[0], PAYLOADS[1], PAYLOADS[2])
    assert_inert(view.snapshot_html(), PAYLOADS[0], PAYLOADS[1], PAYLOADS[2])
    failed = JobEvent(type=EventType.FAILED, job_id="j-1", error=f"ValueError: {PAYLOADS[0]} {ANSI}")
    view.handle(failed)
    bundle = view._repr_mimebundle_()
    assert_inert(bundle["text/html"], PAYLOADS[0], PAYLOADS[2])
    assert_inert(widget_html(view.widget), PAYLOADS[0])
    # Text views: the same text as it is (plain text is inert), without terminal escapes.
    lines = [view.snapshot_text(), bundle["text/plain"], *(view.text_line(e) or "" for e in [*events, failed])]
    assert PAYLOADS[0] in view.snapshot_text()
    assert not [line for line in [*lines, view.snapshot_html()] if "\x1b" in line or "\x07" in line or "title" in line]
    view.close()


def test_offer_locations_and_errors_are_inert_in_the_offer_browser(ip: Any, markets: Markets,
                                                                   dummy_comm: None) -> None:
    from burst_jupyter.offer_book import ProviderLine, ProvidersStatus
    from burst_jupyter.widgets import OfferBrowser, OfferFilter

    # A host writes its own location: HTML, and lines that would become code in an inserted cell.
    where = f"{PAYLOADS[1]}\n%%bash\nrm -rf ~"
    markets.vast.add_offer(gpu_name="RTX 4090", dph_total=0.11, dph_base=0.11, geolocation=where)
    browser = ip.run_line_magic("burst", "offers --gpu RTX_4090 --max-price 0.5")
    offer = browser.offers[0]
    assert offer.location == where
    assert_inert(browser.snapshot_html(), PAYLOADS[1])
    assert_inert(browser._repr_html_(), PAYLOADS[1])
    assert_inert(widget_html(browser.widget), PAYLOADS[1])
    browser.select(offer)
    first, comment, *rest = browser.cell_text().splitlines()
    assert first.startswith("%%burst ") and comment.startswith("# ") and rest == []
    browser.close()

    def failing(flt: OfferFilter, refresh: bool) -> Any:
        raise RuntimeError(PAYLOADS[0])

    broken = OfferBrowser(search=failing, initial=OfferFilter(gpu="RTX_4090"), providers=["vast"],
                          kernel_present=lambda: True)
    assert_inert(broken.snapshot_html(), PAYLOADS[0])
    assert_inert(widget_html(broken.widget), PAYLOADS[0])
    broken.close()
    # A provider's error text (an API's answer) in `%burst providers`.
    status = ProvidersStatus([ProviderLine("vast", True, False, {}, PAYLOADS[2])])
    assert_inert(status._repr_html_(), PAYLOADS[2])


def test_remote_html_is_inert_in_the_ledger_budget_and_notebook_error(ip: Any, dummy_comm: None) -> None:
    result, streams = run_cell(ip, cell(f"--name {NAME}", f"""
        burst.progress(10, {PAYLOADS[2] + ANSI!r})
        print({PAYLOADS[0] + ANSI!r})
        raise ValueError({PAYLOADS[0] + ANSI!r})
    """))
    job = last_job()
    assert job.result().status is JobStatus.FAILED and isinstance(result.error_in_exec, RemoteError)
    assert job.spec.name == NAME
    view = JobView(job_id=job.id, name=job.spec.name, max_cost_usd=None, kernel_present=lambda: True)
    for event in job.events:
        view.handle(event)
    assert_inert(view.snapshot_html(), PAYLOADS[0], NAME, PAYLOADS[2])
    assert_inert(widget_html(view.widget), PAYLOADS[0], NAME, PAYLOADS[2])
    view.close()
    table = ip.run_line_magic("burst", "ledger")
    assert (row := table.rows[-1]).name == NAME and PAYLOADS[0] in (row.message or "")
    assert_inert(table._repr_html_(), NAME)
    assert PAYLOADS[0] not in table._repr_html_()
    bars = ip.run_line_magic("burst", "budget")
    assert "<script" not in bars.snapshot_html() and "<script" not in widget_html(bars.widget)
    # burst's own status lines in the notebook carry no terminal escapes (the cell's own output is its own).
    assert not [line for line in streams.text(ours=True).splitlines() if line.startswith("[burst]") and "\x1b" in line]


def test_budget_labels_are_inert_in_the_budget_bars(dummy_comm: None) -> None:
    from burst_jupyter.widgets import BudgetBars

    @dataclass(frozen=True)
    class Period:
        period: str
        label: str
        spent: Decimal = Decimal(1)
        reserved: Decimal = Decimal(0)
        cap: Decimal | None = Decimal(2)
        fraction: float | None = 0.5
        warning: bool = False

    @dataclass(frozen=True)
    class Snapshot:
        day: Period
        week: Period

    bars = BudgetBars(Snapshot(Period("day", PAYLOADS[0]), Period("week", PAYLOADS[1])), kernel_present=lambda: True)
    assert_inert(bars.snapshot_html(), PAYLOADS[0], PAYLOADS[1])
    assert_inert(widget_html(bars.widget), PAYLOADS[0], PAYLOADS[1])
    bars.close()


def test_burst_show_sends_no_remote_escape_to_the_terminal(burst_home: Path, capsys: Any) -> None:
    import sys

    from burst_jupyter.budget import Budget
    from burst_jupyter.cli import main

    # OSC 52 writes the terminal's clipboard; OSC 0 sets its title; CSI 2J clears the screen.
    evil = r"print('\x1b]52;c;ZXZpbA==\x07\x1b]0;owned\x07\x1b[2Jvisible')"
    assert main(["submit", "--provider", "local", "--", sys.executable, "-c", evil]) == 0
    capsys.readouterr()
    with Budget(burst_home / "burst.sqlite3") as budget:
        (row,) = budget.rows()
    assert main(["show", row.job_id]) == 0
    out, _ = capsys.readouterr()
    assert "  visible" in out.splitlines()
    assert "\x1b" not in out and "\x07" not in out


def test_a_job_key_is_0600_in_a_0700_folder_even_if_the_folder_was_wider(tmp_path: Path) -> None:
    from burst_jupyter.keys import create_job_key, remove_job_key

    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    key = create_job_key(folder, "job-1", comment="tag/job-1")
    assert folder.stat().st_mode & 0o777 == 0o700
    assert key.private_path.stat().st_mode & 0o777 == 0o600
    remove_job_key(folder, "job-1")
    assert list(folder.iterdir()) == []
