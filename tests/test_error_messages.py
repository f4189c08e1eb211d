"""Every error a user meets says what to fix once, in the words they type: a refused key names the variable (or
the config table) it came from and its provider once; a command or option a message names exists; a remote
traceback reads as Python's own; a bad option or config key is named as it was written."""

from __future__ import annotations

from typing import Any

import pytest
from burst_checks import cell, run_cell, usage_line
from marketplaces import GPU, Markets

import burst_jupyter as burst

KEY_VARS = {"vast": "VAST_API_KEY", "runpod": "RUNPOD_API_KEY", "thunder": "TNR_API_TOKEN"}


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
