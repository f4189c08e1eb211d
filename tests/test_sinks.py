"""Result sinks with real parts: a real moto S3 server on loopback, real %%burst jobs on the local provider, the
real reaper process. Each test asserts what landed in the bucket (or folder) and what was rented, not which
functions were called.

No network beyond 127.0.0.1: boto3 is pointed at moto through AWS_ENDPOINT_URL, instance metadata is off, and
r2:// is only parsed (its Cloudflare endpoint is never contacted) or pointed at moto the same way.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from burst_checks import (
    cell,
    last_job,
    ledger_rows,
    live_instances,
    local_jobdirs,
    ok,
    open_reservations,
    run_cell,
    seed_ledger,
    state_row,
    state_row_count,
    usage_line,
    wait_until,
)

import burst_jupyter as burst
from burst_jupyter.errors import ConfigError, SyncError
from burst_jupyter.events import EventType
from burst_jupyter.job import JobStatus
from burst_jupyter.sinks import FolderSink, S3Sink, open_sink

pytestmark = pytest.mark.timeout(90)

boto3 = pytest.importorskip("boto3")


# -- a real S3 server ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m moto.server`` on a free loopback port, for the whole module (buckets are per test)."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    for _ in range(3):  # the port is free when picked; another process may take it before moto binds
        port = _free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        if proc.poll() is None and time.monotonic() < deadline:
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Store:
    endpoint: str
    bucket: str
    client: Any

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        keys = [o["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix) for o in page.get("Contents", [])]
        return {k: self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture
def aws_env(moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """boto3 (here, in the local instance and in a reaper) talks to moto with fake keys, and to nothing else."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "R2_ACCOUNT_ID",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254 for credentials
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return moto_endpoint


@pytest.fixture
def store(aws_env: str) -> Store:
    bucket = f"results-{uuid.uuid4().hex[:12]}"
    client = boto3.session.Session().client("s3")
    client.create_bucket(Bucket=bucket)
    return Store(aws_env, bucket, client)




def assert_nothing_rented(home: Path, seed: Any) -> None:
    assert burst.jobs() == []
    assert local_jobdirs(home) == []
    assert state_row_count(home) == 0
    assert ledger_rows(home) == [seed]
    assert open_reservations(home) == []


WRITER = """
    import os
    assert open("out/keep.txt").read() == "untouched"
    open("out/a.txt", "w").write("alpha")
    os.makedirs("out/deep/er")
    open("out/deep/er/b.bin", "wb").write(bytes(range(256)) * 4)
    open("out/empty.txt", "w").close()
    open("out/big.bin", "wb").write(os.urandom(9 << 20))  # past upload_file's 8 MiB: a multipart upload
"""


def expected_files(out: Path) -> dict[str, bytes]:
    return {rel: (out / rel).read_bytes() for rel in ("a.txt", "deep/er/b.bin", "empty.txt", "big.bin")}


# -- s3:// --------------------------------------------------------------------------------------------------------


def test_s3_sink_stores_every_result_file_under_prefix_job_mount(ip: Any, tmp_path: Path, store: Store,
                                                                  burst_home: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    result, streams = run_cell(ip, cell(f"--sink s3://{store.bucket}/runs --mount ./out:out:rw", WRITER))
    ok(result, streams)
    job = last_job()
    done = job.result()
    assert done.status is JobStatus.COMPLETED and done.notes == []
    local = expected_files(out)
    assert local["a.txt"] == b"alpha" and len(local["big.bin"]) == 9 << 20
    # Only what the cell changed, each at <prefix>/<job id>/<mount name>/<path>; keep.txt was not touched.
    assert store.objects() == {f"runs/{job.id}/out/{rel}": data for rel, data in local.items()}
    assert live_instances(burst_home) == [] and local_jobdirs(burst_home) == []


def test_job_id_in_the_url_is_replaced_not_appended(ip: Any, tmp_path: Path, store: Store) -> None:
    result, streams = run_cell(ip, cell(
        f"--sink s3://{store.bucket}/exp/{{job_id}}/results --mount ./out:models/out:rw --name sweep",
        "open('models/out/w.txt', 'w').write('weights')"))
    ok(result, streams)
    job = last_job()
    assert job.id.startswith("sweep-")
    # The mount's remote path names it in the sink, as it did for folders before (models/out -> models_out).
    assert store.objects() == {f"exp/{job.id}/results/models_out/w.txt": b"weights"}


def test_result_sink_from_the_user_config_reaches_the_sink(ip: Any, tmp_path: Path, store: Store) -> None:
    # The user file (BURST_CONFIG, as conftest sets it); a project's pyproject.toml may not choose where results go.
    (tmp_path / "no-user-config.toml").write_text(f'result-sink = "s3://{store.bucket}/from-config"\n')
    result, streams = run_cell(ip, cell("--mount ./out:out:rw", "open('out/c.txt', 'w').write('configured')"))
    ok(result, streams)
    assert store.objects() == {f"from-config/{last_job().id}/out/c.txt": b"configured"}


def test_a_missing_bucket_is_refused_before_anything_is_rented(ip: Any, tmp_path: Path, aws_env: str,
                                                               burst_home: Path) -> None:
    seed = seed_ledger(burst_home)
    marker = tmp_path / "cell-ran"
    result, _ = run_cell(ip, cell("--sink s3://no-such-bucket-here/runs --mount ./out:out:rw",
                                  f"open({str(marker)!r}, 'w').write('x')"))
    assert usage_line(result) == (
        "result sink s3://no-such-bucket-here/runs: bucket 'no-such-bucket-here' does not exist")
    assert not marker.exists()
    assert_nothing_rented(burst_home, seed)


def test_missing_credentials_are_one_clear_line(ip: Any, store: Store, burst_home: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seed = seed_ledger(burst_home)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    result, _ = run_cell(ip, cell(f"--sink s3://{store.bucket}/runs", "print('never')"))
    line = usage_line(result)
    assert line.startswith(f"result sink s3://{store.bucket}/runs: no credentials found")
    assert "AWS_ACCESS_KEY_ID" in line
    assert_nothing_rented(burst_home, seed)


def test_without_boto3_the_message_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install boto3 \(or burst-jupyter\[s3\]\)"):
        open_sink("s3://bucket/runs", job_id="j-1").check()


def test_an_unknown_scheme_is_refused_with_the_supported_ones(ip: Any, tmp_path: Path, burst_home: Path) -> None:
    seed = seed_ledger(burst_home)
    result, _ = run_cell(ip, cell("--sink gs://bucket/runs --mount ./out:out:rw", "print('never')"))
    line = usage_line(result)
    assert line.startswith("result sink gs://bucket/runs: unknown scheme gs://")
    for supported in ("a folder", "file://", "s3://", "r2://"):
        assert supported in line
    assert_nothing_rented(burst_home, seed)
    with pytest.raises(ConfigError, match="name a bucket"):
        open_sink("s3:///runs")


def test_a_failing_sink_keeps_the_local_results_and_says_so(ip: Any, tmp_path: Path, store: Store,
                                                            burst_home: Path) -> None:
    # The bucket exists when the job is planned; the cell deletes it (the local instance reaches moto too), so
    # every put fails on the way back.
    result, streams = run_cell(ip, cell(f"--sink s3://{store.bucket}/runs --mount ./out:out:rw", f"""
        import boto3
        open("out/one.txt", "w").write("1")
        open("out/two.txt", "w").write("2")
        boto3.session.Session().client("s3", endpoint_url={store.endpoint!r}).delete_bucket(Bucket={store.bucket!r})
    """))
    ok(result, streams)
    assert (tmp_path / "out" / "one.txt").read_text() == "1"
    assert (tmp_path / "out" / "two.txt").read_text() == "2"
    done = last_job().result()
    assert done.status is JobStatus.COMPLETED
    (note,) = done.notes
    assert note.startswith(f"result sink s3://{store.bucket}/runs: could not store out/")
    assert f"bucket {store.bucket!r} does not exist" in note
    assert "(1 more file(s) not stored either); the results are in the local folder" in note
    assert f"burst: {note}\n" in streams.text("stderr")
    assert live_instances(burst_home) == [] and local_jobdirs(burst_home) == []


# -- r2:// --------------------------------------------------------------------------------------------------------


def test_r2_url_parses_to_the_account_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "R2_ACCOUNT_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="set R2_ACCOUNT_ID"):
        open_sink("r2://models/runs", job_id="j-1")
    monkeypatch.setenv("R2_ACCOUNT_ID", "0123abcd")
    sink = open_sink("r2://models/runs//nested/", job_id="train-00ff")
    assert isinstance(sink, S3Sink)
    assert (sink.endpoint_url, sink.region) == ("https://0123abcd.r2.cloudflarestorage.com", "auto")
    assert (sink.bucket, sink.prefix) == ("models", "runs/nested/train-00ff")
    assert sink.describe() == "r2://models/runs/nested/train-00ff"
    assert sink.key("out/a.txt") == "runs/nested/train-00ff/out/a.txt"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert isinstance(sink := open_sink("r2://models"), S3Sink) and sink.endpoint_url == "http://127.0.0.1:9"
    assert sink.prefix == ""


def test_r2_sink_stores_results_through_aws_endpoint_url(ip: Any, tmp_path: Path, store: Store) -> None:
    result, streams = run_cell(ip, cell(f"--sink r2://{store.bucket}/r2runs --mount ./out:out:rw",
                                        "open('out/r.txt', 'w').write('via r2')"))
    ok(result, streams)
    assert store.objects() == {f"r2runs/{last_job().id}/out/r.txt": b"via r2"}


# -- folders ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["relative", "file-url"])
def test_folder_sink_gets_a_copy_of_each_result(ip: Any, tmp_path: Path, form: str) -> None:
    url = "./keep" if form == "relative" else f"file://{tmp_path / 'keep'}"
    result, streams = run_cell(ip, cell(f"--sink {url} --mount ./out:out:rw", """
        import os
        os.makedirs("out/sub")
        open("out/sub/x.txt", "w").write("x")
        open("out/y.txt", "w").write("y")
    """))
    ok(result, streams)
    job_dir = tmp_path / "keep" / last_job().id / "out"
    assert sorted(p.relative_to(job_dir).as_posix() for p in job_dir.rglob("*") if p.is_file()) == [
        "sub/x.txt", "y.txt"]
    assert (job_dir / "sub" / "x.txt").read_text() == "x"
    assert not list((tmp_path / "keep").rglob("*burst-tmp"))


def test_a_folder_sink_that_cannot_be_made_is_refused_or_reported(ip: Any, tmp_path: Path,
                                                                  burst_home: Path) -> None:
    seed = seed_ledger(burst_home)
    (tmp_path / "taken").write_text("a file, not a folder")
    result, _ = run_cell(ip, cell("--sink ./taken/runs", "print('never')"))
    assert usage_line(result) == f"result sink ./taken/runs: {tmp_path / 'taken'} is not a folder"
    assert_nothing_rented(burst_home, seed)
    # Fine when planned; then the cell puts a file where the sink folder goes: the local results still arrive.
    blocker = tmp_path / "later"
    result, streams = run_cell(ip, cell("--sink ./later --mount ./out:out:rw", f"""
        open({str(blocker)!r}, "w").write("in the way")
        open("out/z.txt", "w").write("z")
    """))
    ok(result, streams)
    assert (tmp_path / "out" / "z.txt").read_text() == "z"
    (note,) = last_job().result().notes
    assert note.startswith("result sink ./later: could not store out/z.txt: ")
    assert note.endswith("; the results are in the local folder")
    assert f"burst: {note}" in streams.text("stderr")


def test_sink_urls_round_trip_through_describe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R2_ACCOUNT_ID", "abc")
    for url in ("s3://b/p", "r2://b/p/q", str(tmp_path / "f"), "./rel"):
        sink = open_sink(url, job_id="j-1")
        again = open_sink(sink.describe())
        assert again.describe() == sink.describe()
    folder = open_sink("./rel", job_id="j-1")
    assert isinstance(folder, FolderSink) and folder.root == tmp_path / "rel" / "j-1"
    with pytest.raises(SyncError, match=r"could not store a\.txt"):
        FolderSink(tmp_path / "missing.txt" / "x").put("a.txt", tmp_path / "missing.txt")


# -- the reaper ---------------------------------------------------------------------------------------------------


def test_the_reaper_stores_results_in_the_sink(ip: Any, tmp_path: Path, store: Store, burst_home: Path) -> None:
    (tmp_path / "out").mkdir()
    result, streams = run_cell(ip, cell(f"--background --sink s3://{store.bucket}/reaped --mount ./out:out:rw", """
        import time
        open("out/early.txt", "w").write("before the kernel went")
        print("written", flush=True)
        time.sleep(60)
    """))
    ok(result, streams)
    job = result.result
    wait_until(lambda: any(e.type is EventType.OUTPUT and "written" in (e.text or "") for e in job.events),
               "the cell wrote its file")
    # `%burst shutdown` does what the exit hooks do: hand the job to a detached reaper process, which syncs back,
    # stores in the sink, terminates and settles.
    down, said = run_cell(ip, "%burst shutdown")
    ok(down, said)
    assert f"handed 1 job(s) to the reaper: {job.id}" in said.text("stdout")
    wait_until(lambda: (row := state_row(burst_home, job.id)) is not None and row.state == "terminated",
               "the reaper terminated the job", limit=60)
    assert (tmp_path / "out" / "early.txt").read_text() == "before the kernel went"
    assert store.objects() == {f"reaped/{job.id}/out/early.txt": b"before the kernel went"}
    # The reaper stored it, not the kernel's own reader (which let go of the job when it was handed off).
    logs = "".join(p.read_text() for p in (burst_home / "logs").glob("reaper-*.log"))
    assert f"{job.id}: stored 1 file(s) in s3://{store.bucket}/reaped/{job.id}" in logs
    assert job.wait(timeout=30).status is JobStatus.CANCELLED
    assert live_instances(burst_home) == [] and local_jobdirs(burst_home) == []
