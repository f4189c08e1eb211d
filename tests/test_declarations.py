"""A provider declares itself once (providers/declaration.py), and nothing else keys on its name."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from burst_jupyter.config import AccountSettings, Settings, load_settings
from burst_jupyter.connections import Connections
from burst_jupyter.errors import ConfigError
from burst_jupyter.providers import REGISTRY, build_provider, is_marketplace, marketplaces, preference
from burst_jupyter.providers.base import Capability, Provider
from burst_jupyter.providers.catalog import GpuSpellings
from burst_jupyter.providers.declaration import AccountSource, BuildContext, ProviderConfig, ProviderDeclaration

ROOT = Path(__file__).resolve().parent.parent
MARKETS = [d.name for d in marketplaces()]


def test_every_provider_builds_as_it_declares(tmp_path: Path) -> None:
    settings = Settings().merged(**{name: {"api-key": "k", "url": "http://127.0.0.1:9"} for name in MARKETS})
    connections = Connections()
    try:
        for name, declared in REGISTRY.items():
            provider = build_provider(ProviderConfig(name=name, hosts=("box",)), connections=connections,
                                      home=tmp_path, settings=settings)
            assert (provider.name, provider.capabilities) == (name, declared.capabilities)
            assert is_marketplace(name) == (Capability.RENTED in provider.capabilities)
            asyncio.run(provider.aclose())  # part of the protocol: a no-op where nothing is held
    finally:
        connections.close_all()


def test_a_marketplace_has_an_account_and_a_preference_and_nothing_else_does() -> None:
    def build(config: ProviderConfig, context: BuildContext) -> Provider:
        raise AssertionError("never built here")

    account = AccountSource(key_var="X_KEY", url_var="X_URL", default_url="https://x.test")
    rented = frozenset({Capability.RENTED})
    ProviderDeclaration(name="lambda", build=build, capabilities=rented, account=account, preference=1)
    for bad in (dict(capabilities=rented, preference=1), dict(capabilities=rented, account=account),
                dict(account=account, preference=1), dict(preference=1)):
        with pytest.raises(ValueError, match="a rented provider, and only one, has an account and a preference"):
            ProviderDeclaration(name="x", build=build, **bad)  # type: ignore[arg-type]  # a dict of several types
    for name in ("Lambda", "lambda-cloud", ""):
        with pytest.raises(ValueError, match="lower case letters, digits and _ only"):
            ProviderDeclaration(name=name, build=build)


def test_gpu_spellings_know_the_catalog_only_and_keep_its_order() -> None:
    with pytest.raises(ValueError, match="RTX_9999: not in the catalog"):
        GpuSpellings({"RTX_9999": "RTX 9999"})
    spelled = GpuSpellings({"H100": "h100", "A100_80GB": ("a100", "a100xl"), "A100_40GB": "a100"})
    assert spelled.of(None) == spelled.of("ANY") == ("a100", "a100xl", "h100")  # catalog order, once each
    assert spelled.of("a100 80gb") == ("a100", "a100xl") and spelled.of("RTX_4090") == ()
    assert (spelled.identify("a100"), spelled.identify("a100", memory_gb=79.6)) == ("A100_40GB", "A100_80GB")
    assert spelled.identify("b200") is None


def test_the_default_preference_is_the_declared_one() -> None:
    assert preference() == Settings().prefer == ["runpod", "thunder", "lambda", "vast"]
    assert sorted(preference()) == sorted(MARKETS)


@pytest.mark.parametrize("name", MARKETS)
def test_every_marketplace_account_is_a_table_of_its_name(tmp_path: Path, name: str) -> None:
    user = tmp_path / "user.toml"
    user.write_text(f'[{name}]\napi-key = "k"\nssh-user = "me"\n', encoding="utf-8")
    settings = load_settings(cwd=tmp_path, user_file=user)
    assert settings.accounts[name].ssh_user == "me" and list(settings.accounts) == [name]
    assert not hasattr(settings, name)  # no Settings field per marketplace: `lambda` could not be one


def test_an_account_is_only_for_a_declared_marketplace(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no marketplace is named nowhere"):
        Settings(accounts={"nowhere": AccountSettings()})
    user = tmp_path / "user.toml"
    user.write_text('[nowhere]\napi-key = "k"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'nowhere'"):
        load_settings(cwd=tmp_path, user_file=user)


def _literals(path: Path) -> list[tuple[int, str]]:
    """Every string constant of a module that is not a docstring, with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_code_outside_a_providers_own_modules_names_a_marketplace() -> None:
    def own(path: Path) -> bool:  # vast.py and vast_declared.py; lambda_cloud.py and lambda_cloud_declared.py
        return path.parent.name == "providers" and any(path.stem == n or path.stem.startswith(f"{n}_") for n in MARKETS)

    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
             for folder in ("burst_jupyter", "providers", "budget") for path in sorted((ROOT / folder).rglob("*.py"))
             if not own(path) for line, text in _literals(path) if text in MARKETS]
    assert found == []
