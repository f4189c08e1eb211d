"""A cloned project folder is untrusted (issue 9): its pyproject.toml shapes jobs, never redirects credentials,
trusts a host or loosens a limit, and an API key goes only over https or to a loopback address the user named.

Where a key could have gone, a real HTTP server on 127.0.0.1 records every request it gets (method, path and
Authorization header). A plain-http address that is not loopback is reached as httpx would reach one on a real
network from here: through the HTTP proxy in HTTP_PROXY, which is such a recording server.
"""

from __future__ import annotations

import contextlib
import http.server
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, local_jobdirs, recorded, run_cell, state_row_count, usage_line, write

from burst_jupyter import reconcile
from burst_jupyter.errors import ConfigError
from burst_jupyter.session import Session

pytestmark = pytest.mark.timeout(60)

ENV = {"vast": ("VAST_API_KEY", "VAST_URL"), "runpod": ("RUNPOD_API_KEY", "RUNPOD_API_BASE_URL"),
       "thunder": ("TNR_API_TOKEN", "TNR_API_URL")}


@dataclass
class Catcher:
    """What one recording server was sent: (method, path or proxied URL, Authorization header)."""

    url: str
    seen: list[tuple[str, str, str]] = field(default_factory=list)


@contextlib.contextmanager
def catcher() -> Iterator[Catcher]:
    caught = Catcher("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            caught.seen.append((self.command, self.path, self.headers.get("authorization", "")))
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_DELETE = _any

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    caught.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield caught
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def home_api() -> Iterator[Catcher]:
    """The API address the user chose (their own config file points at it)."""
    with catcher() as caught:
        yield caught


@pytest.fixture
def evil() -> Iterator[Catcher]:
    """An address somebody else chose."""
    with catcher() as caught:
        yield caught


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, home_api: Catcher) -> dict[str, str]:
    """A canary API key for every marketplace in the environment; the user file sends all three to ``home_api``
    (no URL variable is set, so a project's url, were it taken, would win)."""
    made = {name: f"canary-{name}-{secrets.token_hex(8)}" for name in ENV}
    for name, (key_var, url_var) in ENV.items():
        monkeypatch.setenv(key_var, made[name])
        monkeypatch.delenv(url_var, raising=False)
    user = write(tmp_path / "user-config.toml", "".join(f'[{name}]\nurl = "{home_api.url}"\n' for name in ENV))
    monkeypatch.setenv("BURST_CONFIG", str(user))
    return made


def load_extension(ip: Any) -> str:
    """Reload the extension as ``%load_ext`` in this folder would, wait for its background pass, and return what
    it printed."""
    Session.reset_current()
    with recorded() as streams:
        ip.run_line_magic("reload_ext", "burst_jupyter")
        reconcile.wait_background()
    return streams.text()


@pytest.mark.parametrize("market", list(ENV))
def test_a_project_pointing_a_marketplace_url_elsewhere_gets_no_key(ip: Any, tmp_path: Path, keys: dict[str, str],
                                                                    home_api: Catcher, evil: Catcher,
                                                                    market: str) -> None:
    project = write(tmp_path / "pyproject.toml", f'[project]\nname = "cloned"\n\n[tool.burst.{market}]\n'
                    f'url = "{evil.url}"\n')
    url_var = ENV[market][1]
    refusal = (f"{project} [tool.burst.{market}] url: a project file cannot set where credentials go; set "
               f"{url_var} or url in {tmp_path / 'user-config.toml'}")
    printed = load_extension(ip)
    assert printed == f"burst: {refusal}\n"
    result, _ = run_cell(ip, cell(f"--provider {market} --gpu ANY --max-cost 1 --dry-run"))
    assert usage_line(result) == refusal
    result, _ = run_cell(ip, cell("--provider local --max-cost 1", "print('ran')"))
    assert usage_line(result) == refusal
    assert evil.seen == [] and home_api.seen == [], "a key was sent while the project's settings were refused"
    assert local_jobdirs(Path.cwd() / "burst-home") == [] and state_row_count(Path.cwd() / "burst-home") == 0

    # Without the project's table, the user's own address is where each key goes (and only that one).
    project.write_text('[project]\nname = "cloned"\n')
    load_extension(ip)
    result, _ = run_cell(ip, cell(f"--provider {market} --gpu ANY --max-cost 1 --dry-run"))
    assert evil.seen == []
    assert f"Bearer {keys[market]}" in {auth for _, _, auth in home_api.seen} or any(
        keys[market] in path for _, path, _ in home_api.seen), home_api.seen  # Vast may take it in the query


@pytest.mark.parametrize(("line", "setting"), [
    ('hosts = ["127.0.0.1"]', "hosts"),
    ("trust-new-hosts = true", "trust-new-hosts"),
    ("lease-seconds = 0", "lease-seconds"),
    ('remote-python = "python3 -c \\"import os; os.system(\'id\')\\"; python3"', "remote-python"),
    ("max-cost = 50", "max-cost"),
])
def test_a_project_cannot_trust_redirect_or_loosen(ip: Any, tmp_path: Path, burst_home: Path, line: str,
                                                   setting: str) -> None:
    write(tmp_path / "no-user-config.toml", "max-cost = 2\n")
    project = write(tmp_path / "pyproject.toml", f"[tool.burst]\n{line}\n")
    Session.reset_current()
    result, _ = run_cell(ip, cell("--provider local", "open('ran', 'w').write('x')"))
    text = usage_line(result)
    assert text.startswith(f"{project} [tool.burst] {setting}: a project file "), text
    assert str(tmp_path / "no-user-config.toml") in text
    assert not Path("ran").exists()
    assert local_jobdirs(burst_home) == [] and state_row_count(burst_home) == 0


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Catcher]:
    """Every plain-http request to a non-loopback host goes through this recording proxy."""
    with catcher() as caught:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", caught.url)
        monkeypatch.setenv("http_proxy", caught.url)
        yield caught


@pytest.mark.parametrize("where", ["environment", "user file"])
@pytest.mark.parametrize("market", list(ENV))
def test_a_plain_http_address_that_is_not_loopback_never_gets_a_key(ip: Any, tmp_path: Path, keys: dict[str, str],
                                                                   proxy: Catcher, market: str,
                                                                   where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://api.burst-test.example"
    url_var = ENV[market][1]
    user = tmp_path / "user-config.toml"
    if where == "environment":
        monkeypatch.setenv(url_var, url)
        named = url_var
    else:
        user.write_text(f'[{market}]\nurl = "{url}"\n')
        named = f"url under [{market}] in {user}"
    refusal = (f"{named} = {url!r}: an API key is sent only over https, or over http to a loopback address "
               f"(127.0.0.1, ::1, localhost); {market}'s key was not sent")
    assert load_extension(ip) == f"burst: {refusal}\n"
    result, _ = run_cell(ip, cell(f"--provider {market} --gpu ANY --max-cost 1 --dry-run"))
    assert usage_line(result) == refusal
    assert proxy.seen == [], "a key went out over plain http"


def test_the_http_client_itself_refuses_to_attach_a_key_to_plain_http(proxy: Catcher) -> None:
    """The last gate, for any caller that builds a provider without going through the accounts."""
    from burst_jupyter.providers.runpod import RunPodProvider
    from burst_jupyter.providers.thunder import ThunderProvider
    from burst_jupyter.providers.vast import VastProvider

    for cls in (VastProvider, RunPodProvider, ThunderProvider):
        with pytest.raises(ConfigError, match=r"an API key is sent only over https.*not 'http://api\.example"):
            cls(api_key="canary", base_url="http://api.example")
    assert proxy.seen == []


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://console.vast.ai", True),
    ("https://api.thundercompute.com:8443/v1", True),
    ("http://127.0.0.1:8080", True),
    ("http://127.3.2.1", True),
    ("http://[::1]:8080/api", True),
    ("http://localhost:9", True),
    ("http://api.runpod.io", False),
    ("http://127.0.0.1.evil.test", False),
    ("http://localhost.evil.test", False),
    ("http://0.0.0.0:80", False),
    ("ftp://127.0.0.1", False),
    ("console.vast.ai", False),
    ("https://", False),
])
def test_where_a_key_may_go(url: str, allowed: bool) -> None:
    from burst_jupyter.providers.accounts import key_url_problem

    assert (key_url_problem(url) is None) == allowed


def test_ending_instances_reads_accounts_from_the_user_file_alone(tmp_path: Path, keys: dict[str, str],
                                                                  home_api: Catcher, evil: Catcher) -> None:
    """The reaper and the load-time cleanup read the user's settings only, so a folder whose pyproject.toml is
    refused (or changed while a job ran) can neither stop them nor point them elsewhere."""
    from burst_jupyter.config import load_settings
    from burst_jupyter.providers.accounts import accounts

    write(tmp_path / "pyproject.toml", f'[tool.burst.vast]\nurl = "{evil.url}"\n')
    with pytest.raises(ConfigError, match=r"\[tool\.burst\.vast\] url: a project file cannot set where credentials"):
        load_settings(cwd=tmp_path)
    found = accounts(load_settings(cwd=tmp_path, project=False))
    assert {name: a.base_url for name, a in found.items()} == dict.fromkeys(ENV, home_api.url)
