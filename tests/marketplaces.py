"""The four marketplace fakes behind real loopback HTTP servers, configured the way a user would configure them.

A pytest plugin (tests/conftest.py loads it) with the fixture ``markets``: FakeVast, FakeRunPod, FakeThunder and
FakeLambda each serve on 127.0.0.1; VAST_API_KEY/VAST_URL, RUNPOD_API_KEY/RUNPOD_API_BASE_URL,
TNR_API_TOKEN/TNR_API_URL and LAMBDA_API_KEY/LAMBDA_API_BASE_URL point at them (the variables each provider's
own tools read; a test module chooses the keys by overriding the fixture ``market_keys``, e.g. with canaries to
hunt for), and the user config file says to log in as the test's user (the fakes' machines are sshd processes run
by this user, who may not be root or ubuntu). Every instance is a real sshd that boots after ``switches.boot_delay``.

At the end of each test the fixture checks what a user fears most: no instance is left running at any fake, no
job's SSH key is left in an account (Lambda's keys are account-wide) and no process is left on any of their
machines.
"""

from __future__ import annotations

import contextlib
import getpass
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from fakes.base import FakeCloud
from fakes.lambda_cloud import FakeLambda
from fakes.runpod import CLOUDS, FakeRunPod
from fakes.thunder import FakeThunder
from fakes.vast import FakeVast

from burst_jupyter.job import MIN_BILLABLE_SECONDS, cost_of
from burst_jupyter.providers import REGISTRY
from burst_jupyter.providers.lambda_cloud import LambdaProvider
from burst_jupyter.providers.runpod import RunPodProvider
from burst_jupyter.providers.thunder import ThunderProvider
from burst_jupyter.providers.vast import VastProvider

__all__ = ["GPU", "LAMBDA_OFFER", "RUNPOD_GPU", "TEARDOWN", "THUNDER_SPEC", "Markets", "cap_buying", "market_keys",
           "markets", "set_rate"]

GPU = {"vast": "RTX_4090", "runpod": "RTX_4090", "thunder": "H100", "lambda": "H100"}  # a GPU each fake offers
TEARDOWN = {p.name: p.teardown_seconds for p in (VastProvider, RunPodProvider, ThunderProvider, LambdaProvider)}
RUNPOD_GPU = "NVIDIA GeForce RTX 4090"
THUNDER_SPEC = "h100_x1_production"
LAMBDA_TYPE, LAMBDA_REGION = "gpu_1x_h100_pcie", "us-east-1"
LAMBDA_OFFER = f"lambda:{LAMBDA_TYPE}@{LAMBDA_REGION}"


@dataclass
class Markets:
    vast: FakeVast
    runpod: FakeRunPod
    thunder: FakeThunder
    lambda_cloud: FakeLambda  # "lambda" is a Python keyword
    config: Path

    @property
    def all(self) -> dict[str, FakeCloud]:
        return {"vast": self.vast, "runpod": self.runpod, "thunder": self.thunder, "lambda": self.lambda_cloud}

    def creates(self) -> int:
        """Create requests seen by every fake (a dry run must make none)."""
        markers = ("/asks/", "/instances/create", "/instance-operations/launch")
        return sum(1 for cloud in self.all.values() for r in cloud.requests
                   if (r.method in ("PUT", "POST") and any(m in r.path for m in markers))
                   or (isinstance(r.body, dict) and "podFindAndDeploy" in str(r.body.get("query", ""))))

    def leftovers(self) -> dict[str, list[object]]:
        """Instances still running, and job keys left in an account (``"<name> keys"``): both are leaks."""
        left: dict[str, list[object]] = {name: cloud.running() for name, cloud in self.all.items() if cloud.running()}
        if self.lambda_cloud.leaked():
            left["lambda keys"] = list(self.lambda_cloud.leaked())
        return left

    def processes(self) -> list[int]:
        return [pid for cloud in self.all.values() for m in cloud.machines.all for pid in m.processes()]


def cap_buying(rate: Decimal, provider: str, *, spare: float) -> Decimal:
    """A cap that buys ``spare`` seconds more than the least ``check_cap`` accepts (cost_of rounds it up)."""
    return cost_of(rate, MIN_BILLABLE_SECONDS + TEARDOWN[provider] + spare)


def set_rate(markets: Markets, provider: str, rate: Decimal) -> str | None:
    """Make ``provider``'s next instance bill ``rate`` $/h. Returns the offer to rent: on Vast an offer of its own
    (``vast:ID``); RunPod prices ``GPU["runpod"]`` on both clouds and Thunder an H100 from its table (None); on
    Lambda the one type and region of :data:`LAMBDA_OFFER` (its prices are whole cents)."""
    if provider == "vast":
        offer = markets.vast.add_offer(dph_total=float(rate), dph_base=float(rate))
        return f"vast:{offer['id']}"
    if provider == "runpod":
        for cloud in CLOUDS:  # either cloud's offer, whichever is ranked first, bills the rate
            markets.runpod.set_cloud(RUNPOD_GPU, cloud, price=str(rate))
    elif provider == "lambda":
        cents = rate * 100
        assert cents == int(cents), f"Lambda prices in whole cents, not {rate}"
        markets.lambda_cloud.instance_types[LAMBDA_TYPE]["price_cents_per_hour"] = int(cents)
        return LAMBDA_OFFER
    else:
        markets.thunder.pricing[THUNDER_SPEC] = float(rate)
    return None


@pytest.fixture
def market_keys() -> dict[str, str]:
    """The API key each fake accepts, by provider name; a provider left out keeps the fakes' default."""
    return {}


@pytest.fixture
def markets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, market_keys: dict[str, str]) -> Iterator[Markets]:
    clouds = Markets(FakeVast(tmp_path / "clouds"), FakeRunPod(tmp_path / "clouds"), FakeThunder(tmp_path / "clouds"),
                     FakeLambda(tmp_path / "clouds"), tmp_path / "user-config.toml")
    for name, key in market_keys.items():
        clouds.all[name].api_key = key
    user = getpass.getuser()
    clouds.config.write_text("".join(f'[{name}]\nssh-user = "{user}"\n' for name in clouds.all))
    monkeypatch.setenv("BURST_CONFIG", str(clouds.config))
    with contextlib.ExitStack() as stack:
        for name, cloud in clouds.all.items():
            server = stack.enter_context(cloud.serve())
            account = REGISTRY[name].account  # the variables the provider declares, as a user would set them
            assert account is not None
            monkeypatch.setenv(account.key_var, cloud.api_key)
            monkeypatch.setenv(account.url_var, server.url)
        try:
            yield clouds
            assert clouds.leftovers() == {}, "an instance was left running"
            assert clouds.processes() == [], "a process was left on a rented machine"
        finally:
            from burst_jupyter.session import Session

            Session.reset_current()
            for cloud in clouds.all.values():
                cloud.close()
