"""Every error a user meets says what to fix once, in the words they type: a refused key names the variable (or
the config table) it came from and its provider once; a command or option a message names exists; a remote
traceback reads as Python's own; a bad option or config key is named as it was written."""

from __future__ import annotations

import argparse
import ast
import linecache
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, ok, run_cell, usage_line
from marketplaces import GPU, Markets

import burst_jupyter as burst
from burst_jupyter.errors import RemoteError
from burst_jupyter.events import EventType

KEY_VARS = {"vast": "VAST_API_KEY", "runpod": "RUNPOD_API_KEY", "thunder": "TNR_API_TOKEN", "lambda": "LAMBDA_API_KEY"}


@pytest.mark.ssh
@pytest.mark.timeout(120)
@pytest.mark.parametrize("provider", list(KEY_VARS))
def test_a_refused_key_names_its_provider_once_and_the_variable_to_fix(
        ip: Any, markets: Markets, monkeypatch: pytest.MonkeyPatch, provider: str) -> None:
    monkeypatch.setenv(KEY_VARS[provider], "not-the-key")
    result, streams = run_cell(ip, cell(f"--provider {provider} --gpu {GPU[provider]} --max-cost 1"))
    line = usage_line(result)
    assert f"{provider}: {provider}:" not in line, line
    assert line.count(f"{provider}:") == 1 and "the API key was refused" in line, line
    assert f"set a valid one in {KEY_VARS[provider]}" in line, line
    assert "fits" not in line, line  # nothing was searched: no offer was found not to fit
    if provider == "thunder":  # its prices are public: the search needs no key, the create is refused
        return
    left_out = streams.text("stderr")
    assert f"{provider}: {provider}:" not in left_out and KEY_VARS[provider] in left_out, left_out
    status = repr(burst.provider_status())
    assert f"{provider}: not answering: the API key was refused" in status, status


@pytest.mark.ssh
@pytest.mark.timeout(120)
@pytest.mark.parametrize("provider", list(KEY_VARS))
def test_a_refused_key_from_the_user_file_names_its_table(
        ip: Any, markets: Markets, monkeypatch: pytest.MonkeyPatch, provider: str) -> None:
    monkeypatch.delenv(KEY_VARS[provider])
    markets.config.write_text(markets.config.read_text().replace(
        f"[{provider}]\n", f'[{provider}]\napi-key = "not-the-key"\n'))
    result, _ = run_cell(ip, cell(f"--provider {provider} --gpu {GPU[provider]} --max-cost 1"))
    line = usage_line(result)
    assert line.count(f"{provider}:") == 1, line
    assert f"set a valid one in api-key under [{provider}] in {markets.config}" in line, line


# -- every command and option a message names exists ----------------------------------------------------------

#: Options of other programs that burst's code passes on (never told to a user as one of burst's own).
OTHER_PROGRAMS = {"--query-gpu": "nvidia-smi", "--format": "nvidia-smi", "--others": "git ls-files",
                  "--exclude-standard": "git ls-files", "--args": "docker (RunPod's dockerArgs)",
                  "--reason": "the detached reaper's own argv (reaper.py), run by burst itself"}


def _message_strings() -> Iterator[tuple[str, int, str]]:
    """Every string literal (f-strings whole, their holes as ``{}``) of the installed package but docstrings."""
    import burst_jupyter.budget
    import burst_jupyter.providers

    folders = {Path(module.__file__ or "").parent for module in (burst, burst_jupyter.providers, burst_jupyter.budget)}
    for path in sorted(p for folder in folders for p in folder.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        docstrings |= {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
            else:
                continue
            yield path.name, node.lineno, text


def _options(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Each subcommand path of a parser (``""``, ``"budget set"``) and the options it takes."""
    found: dict[str, set[str]] = {"": set()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= {f"{name} {k}".strip(): v for k, v in _options(sub).items()}
        else:
            found[""] |= set(action.option_strings)
    return found


def test_every_command_and_option_a_message_names_exists(ip: Any) -> None:
    from IPython.core.error import UsageError

    from burst_jupyter.commands import parser
    from burst_jupyter.magics import BurstMagics

    commands = _options(parser("burst"))
    with pytest.raises(UsageError) as unknown:  # the line magic's own list of its commands
        ip.run_line_magic("burst", "no-such-command")
    magic_commands = set(re.findall(r"[a-z]+", str(unknown.value).split("try ", 1)[1])) - {"or"}
    every_option = {o for opts in (*commands.values(), *_options(BurstMagics.burst.parser).values(),
                                   *_options(parser("%burst")).values()) for o in opts}
    wrong = []
    for name, line, text in _message_strings():
        where = f"{name}:{line}: {text!r}"
        for match in re.finditer(r"`burst ([a-z][a-z-]*(?: [a-z]+)?)([^`]*)`", text):
            words = match.group(1).split()
            command = " ".join(words) if " ".join(words) in commands else words[0]
            if command not in commands:
                wrong.append(f"{where}: no command burst {words[0]}")
                continue
            wrong += [f"{where}: burst {command} takes no {o}" for o in re.findall(r"--[a-z][a-z-]*", match.group(2))
                      if o not in commands[command] | commands[""]]
        wrong += [f"{where}: no command %burst {m}" for m in re.findall(r"(?<!%)%burst ([a-z]+)", text)
                  if m not in magic_commands]
        wrong += [f"{where}: no option {o}" for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)
                  if o not in every_option and o not in OTHER_PROGRAMS]
    assert wrong == []


# -- remote tracebacks ----------------------------------------------------------------------------------------

FAILING = """\
print("before")
def inner():
    raise ValueError("boom from the instance")
inner()
"""


def python_traceback(source: str, filename: str) -> list[str]:
    """What this Python prints for ``source`` run as a script named ``filename`` (the local provider's Python)."""
    import traceback

    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        exec(compile(source, filename, "exec"), {"__name__": "__main__", "print": lambda *a: None})
    except ValueError as exc:
        tb = exc.__traceback__
        assert tb is not None
        return "".join(traceback.format_exception(type(exc), exc, tb.tb_next)).rstrip("\n").split("\n")
    finally:
        linecache.cache.pop(filename, None)
    raise AssertionError("it did not raise")


def test_a_remote_traceback_is_the_one_python_prints_for_the_cell(ip: Any) -> None:
    result, streams = run_cell(ip, f"%%burst --provider local --max-cost 1\n{FAILING}")
    error = result.error_in_exec
    assert isinstance(error, RemoteError)
    assert error._render_traceback_() == python_traceback(FAILING, "<burst-cell>")
    shown = streams.text()
    assert shown.count("Traceback (most recent call last):") == 1 and "Remote traceback" not in shown, shown
    assert "burst_jupyter" not in shown and "burst-agent" not in shown, shown


def test_a_submitted_file_s_traceback_names_the_file(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(FAILING)
    proc = subprocess.run([sys.executable, "-m", "burst_jupyter.cli", "submit", "--provider", "local", "--max-cost",
                           "1", "--file", "fail.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().split("\n") == python_traceback(FAILING, "fail.py"), proc.stderr
    assert 'File "fail.py", line 4, in <module>' in proc.stderr and "<burst-cell>" not in proc.stderr


# -- options and config keys, named as the user wrote them ----------------------------------------------------


def test_burst_submit_names_the_option_it_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from burst_jupyter.cli import main

    (tmp_path / "job.py").write_text("print('never')\n")
    for options, message in ((["--max-duration", "0"], "--max-duration: must be at least 1 (got 0)"),
                             (["--lease", "-1"], "--lease: must be at least 0 (got -1)"),
                             (["--sync-every", "1"], "--sync-every: must be at least 5 (got 1)"),
                             (["--max-results", "lots"], "--max-results: the limit must be a size like 500MB")):
        assert main(["submit", "--provider", "local", "--file", str(tmp_path / "job.py"), *options]) == 2
        err = capsys.readouterr().err
        assert message in err and "_" not in err.split(":")[1], err


@pytest.mark.parametrize("where", ["project", "user"])
def test_a_config_file_takes_keys_as_the_readme_spells_them(tmp_path: Path, where: str) -> None:
    from burst_jupyter.config import load_settings
    from burst_jupyter.errors import ConfigError

    project, user = tmp_path / "project", tmp_path / "user.toml"
    project.mkdir()

    def load(text: str) -> Any:
        if where == "project":
            (project / "pyproject.toml").write_text(f"[tool.burst]\n{text}\n")
        else:
            user.write_text(f"{text}\n")
        return load_settings(cwd=project, user_file=user)

    assert load("max-duration = 60").max_duration_minutes == 60  # as the option, --max-duration
    assert load("max-duration-minutes = 50").max_duration_minutes == 50  # the spelling files used before
    assert load("max_duration_minutes = 40").max_duration_minutes == 40
    with pytest.raises(ConfigError, match=r": max-duration: must be at least 1 \(got 0\)$"):
        load("max-duration = 0")
    with pytest.raises(ConfigError, match=r"unknown key 'max-duraton'; did you mean max-duration\?$"):
        load("max-duraton = 5")
    with pytest.raises(ConfigError) as listed:
        load("colour = 5")
    keys = str(listed.value).split("known keys: ")[1].split(", ")
    assert "max-duration" in keys and "daily-budget" in keys and not [k for k in keys if "_" in k], keys


def test_the_offer_search_names_its_options_as_typed(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from IPython.core.error import UsageError

    from burst_jupyter.cli import main

    with pytest.raises(UsageError, match=r"^--max-price must be a number of USD, not 'lots'$"):
        ip.run_line_magic("burst", "offers --max-price lots")
    assert main(["offers", "--max-price", "lots"]) == 2
    assert "--max-price must be a number of USD, not 'lots'" in capsys.readouterr().err


@pytest.mark.ssh
@pytest.mark.timeout(120)
@pytest.mark.parametrize("provider", list(KEY_VARS))
def test_an_offer_taken_before_the_create_is_said_once(ip: Any, markets: Markets, provider: str) -> None:
    markets.all[provider].switches.take_offer_on_create = 1
    result, streams = run_cell(ip, cell(f"--provider {provider} --gpu {GPU[provider]} --max-cost 1", "print('ran')"))
    if provider != "thunder":  # another RTX 4090 ask, the 4090 on RunPod's other cloud, another H100 region
        ok(result, streams)
        said = streams.text("stderr", ours=True) + "".join(e.text or "" for e in burst.jobs()[-1].events
                                                           if e.type is EventType.OUTPUT)
        assert f"burst: {provider}:" in said and "has no capacity now" in said and "moving on to" in said, said
        assert f"{provider}: {provider}:" not in said, said
    else:  # Thunder's production H100 was its one fitting offer (prototyping is not allowed)
        line = usage_line(result)
        assert "tried 1 offer; none could be rented (the last: thunder:h100_x1_production has no capacity now (" \
            in line and "offer(s)" not in line, line
        assert f"{provider}: {provider}:" not in line and line.count(f"{provider}:") == 1, line


def test_each_job_field_is_named_by_an_option_both_lines_take() -> None:
    from burst_jupyter.commands import parser
    from burst_jupyter.magics import BurstMagics
    from burst_jupyter.options import FLAGS as OPTIONS
    from burst_jupyter.spec import JobSpec

    submit = _options(parser("burst"))["submit"]
    cell_line = _options(BurstMagics.burst.parser)[""]
    assert set(OPTIONS) == set(JobSpec.model_fields) - {"cell"}
    # A notebook's variables, a kept machine's idle limit, and the machine a cell runs on: a notebook's alone.
    assert [o for o in OPTIONS.values() if o not in submit] == ["--push", "--pull", "--idle", "--on"]
    assert [o for o in OPTIONS.values() if o not in cell_line] == ["--file", "--idle", "--command"]
