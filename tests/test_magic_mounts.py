"""%%burst --mount on the real local provider: what is uploaded, what comes back, where the remote path lives.

The cell itself asserts what it sees on the instance (a failed assert fails the cell with a RemoteError); the
test asserts what came back on this side and that no link or job folder is left behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, last_job, ledger_rows, live_instances, local_jobdirs, ok, run_cell, usage_line, write

from burst_jupyter.job import JobStatus

pytestmark = pytest.mark.timeout(60)





def assert_clean(home: Path) -> None:
    assert local_jobdirs(home) == []
    assert live_instances(home) == []


def test_ro_mount_is_uploaded_and_not_synced_back(ip: Any, tmp_path: Path, burst_home: Path) -> None:
    write(tmp_path / "data" / "a.txt", "alpha")
    write(tmp_path / "data" / "sub" / "b.txt", "beta")
    result, streams = run_cell(ip, cell("--mount ./data:data:ro", """
        import os
        assert open("data/a.txt").read() == "alpha"
        assert open("data/sub/b.txt").read() == "beta"
        open("data/a.txt", "w").write("changed remotely")
        open("data/new.txt", "w").write("new remotely")
        os.makedirs("data/newdir")
        print("ro ok")
    """))
    ok(result, streams)
    assert "ro ok" in streams.text("stdout")
    assert (tmp_path / "data" / "a.txt").read_text() == "alpha"
    assert sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*")) == [
        "a.txt", "sub", "sub/b.txt"]
    assert_clean(burst_home)


def test_rw_mount_syncs_back_new_modified_nested_and_empty_dirs(ip: Any, tmp_path: Path, burst_home: Path) -> None:
    out = tmp_path / "out"
    write(out / "keep.txt", "untouched")
    write(out / "edit.txt", "before")
    write(out / "nested" / "old.txt", "old")
    result, streams = run_cell(ip, cell("--mount ./out:out:rw", """
        import os
        assert open("out/edit.txt").read() == "before"
        open("out/edit.txt", "w").write("after")
        open("out/new.txt", "w").write("brand new")
        os.makedirs("out/deep/er")
        open("out/deep/er/file.bin", "wb").write(bytes(range(256)) * 40)
        open("out/nested/added.txt", "w").write("added")
        os.makedirs("out/empty/inner")
    """))
    ok(result, streams)
    assert (out / "keep.txt").read_text() == "untouched"
    assert (out / "edit.txt").read_text() == "after"
    assert (out / "new.txt").read_text() == "brand new"
    assert (out / "deep" / "er" / "file.bin").read_bytes() == bytes(range(256)) * 40
    assert (out / "nested" / "old.txt").read_text() == "old"
    assert (out / "nested" / "added.txt").read_text() == "added"
    assert (out / "empty" / "inner").is_dir() and list((out / "empty" / "inner").iterdir()) == []
    assert not [p for p in out.rglob("*burst-tmp")]  # no half-written temporaries left
    result_files = {p.relative_to(out).as_posix() for p in last_job().result().files}
    assert {"edit.txt", "new.txt", "deep/er/file.bin", "nested/added.txt"} <= result_files
    assert "keep.txt" not in result_files
    assert_clean(burst_home)


def test_a_missing_rw_output_folder_is_created(ip: Any, tmp_path: Path) -> None:
    result, streams = run_cell(ip, cell("--mount ./results:results:rw", "open('results/r.txt', 'w').write('r')"))
    ok(result, streams)
    assert (tmp_path / "results" / "r.txt").read_text() == "r"


def test_gitignore_and_burstignore_are_honoured_on_upload(ip: Any, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    write(proj / ".gitignore", "*.log\nbuild/\n")
    write(proj / ".burstignore", "secret.txt\n!keep.log\n")
    for name in ("main.py", "run.log", "keep.log", "secret.txt", "build/out.bin", "src/mod.py", "src/debug.log"):
        write(proj / name, name)
    write(proj / "src" / ".burstignore", "generated_*\n")
    write(proj / "src" / "generated_a.py", "x")
    result, streams = run_cell(ip, cell("--mount ./proj:proj:ro", """
        import os
        seen = sorted(os.path.relpath(os.path.join(d, f), "proj") for d, _, fs in os.walk("proj") for f in fs)
        print(seen)
        for name in ["run.log", "secret.txt", "build/out.bin", "src/debug.log", "src/generated_a.py"]:
            assert not os.path.exists(os.path.join("proj", name)), name + " was uploaded"
        assert not os.path.exists("proj/build"), "an ignored folder was uploaded"
        for name in ["main.py", "keep.log", "src/mod.py", ".gitignore", ".burstignore"]:
            assert os.path.exists(os.path.join("proj", name)), name + " is missing"
    """))
    ok(result, streams)


def test_single_file_mounts_ro_and_rw(ip: Any, tmp_path: Path) -> None:
    write(tmp_path / "config.json", '{"lr": 0.1}')
    write(tmp_path / "notes.txt", "v1")
    write(tmp_path / "sibling.txt", "not part of any mount")
    result, streams = run_cell(ip, cell("--mount ./config.json:cfg.json:ro --mount ./notes.txt:notes.txt:rw", """
        import json, os
        assert json.load(open("cfg.json")) == {"lr": 0.1}
        assert open("notes.txt").read() == "v1"
        open("notes.txt", "w").write("v2")
        open("cfg.json", "w").write("{}")
        assert not os.path.exists("sibling.txt")
    """))
    ok(result, streams)
    assert (tmp_path / "notes.txt").read_text() == "v2"
    assert (tmp_path / "config.json").read_text() == '{"lr": 0.1}'
    assert (tmp_path / "sibling.txt").read_text() == "not part of any mount"


def test_absolute_remote_path_is_a_link_removed_at_the_end(ip: Any, tmp_path: Path, burst_home: Path) -> None:
    write(tmp_path / "data" / "in.txt", "input")
    remote = tmp_path / "elsewhere" / "data"
    result, streams = run_cell(ip, cell(f"--mount ./data:{remote}:rw", f"""
        import os
        assert os.path.islink({str(remote)!r})
        assert open({str(remote / "in.txt")!r}).read() == "input"
        open({str(remote / "made.txt")!r}, "w").write("made at an absolute path")
    """))
    ok(result, streams)
    assert (tmp_path / "data" / "made.txt").read_text() == "made at an absolute path"
    assert not os.path.lexists(remote)
    assert_clean(burst_home)


def test_an_existing_remote_path_is_refused_and_left_alone(ip: Any, tmp_path: Path, burst_home: Path) -> None:
    write(tmp_path / "data" / "in.txt", "input")
    taken = tmp_path / "taken"
    write(taken / "precious.txt", "do not touch")
    marker = tmp_path / "cell-ran"
    result, _ = run_cell(ip, cell(f"--mount ./data:{taken}:rw", f"open({str(marker)!r}, 'w').write('x')"))
    line = usage_line(result)
    assert str(taken) in line and "already exists" in line
    assert sorted(p.name for p in taken.iterdir()) == ["precious.txt"]
    assert (taken / "precious.txt").read_text() == "do not touch"
    assert not marker.exists()
    assert last_job().status is JobStatus.FAILED
    assert ledger_rows(burst_home) == []  # it never started: nothing billed on the local machine
    assert_clean(burst_home)


def test_relative_and_home_remote_paths(ip: Any, tmp_path: Path, burst_home: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # the local "instance" inherits it: ~ is the test's own
    write(tmp_path / "rel" / "r.txt", "rel")
    write(tmp_path / "tilde" / "t.txt", "tilde")
    result, streams = run_cell(ip, cell("--mount ./rel:sub/dir/rel:rw --mount ./tilde:~/burst-data:rw", """
        import os
        assert open("sub/dir/rel/r.txt").read() == "rel"
        here = os.path.expanduser("~/burst-data")
        assert os.path.islink(here) and open(os.path.join(here, "t.txt")).read() == "tilde"
        open("sub/dir/rel/r2.txt", "w").write("rel2")
        open(os.path.join(here, "t2.txt"), "w").write("tilde2")
    """))
    ok(result, streams)
    assert (tmp_path / "rel" / "r2.txt").read_text() == "rel2"
    assert (tmp_path / "tilde" / "t2.txt").read_text() == "tilde2"
    assert not os.path.lexists(home / "burst-data")
    assert_clean(burst_home)


def test_rw_changes_written_before_a_remote_error_still_come_back(ip: Any, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    result, _ = run_cell(ip, cell("--mount ./out:out:rw", """
        open("out/partial.txt", "w").write("half way")
        raise RuntimeError("crashed after writing")
    """))
    assert type(result.error_in_exec).__name__ == "RemoteError"
    assert (tmp_path / "out" / "partial.txt").read_text() == "half way"
