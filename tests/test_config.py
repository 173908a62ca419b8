"""`mcp-fhir config check`: every bad configuration in tests/config_corpus/ is rejected, naming the key.

Each corpus file starts with `# expect: <key>`, the key the error message must name. The shipped
example configurations (examples/configs/) must pass, with their secrets supplied by environment.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from mcp_fhir import config
from mcp_fhir._exceptions import ConfigError
from mcp_fhir.cli.main import main

REPO = Path(__file__).resolve().parents[1]
CORPUS = sorted((REPO / "tests" / "config_corpus").glob("*.yaml"))
EXAMPLES = sorted((REPO / "examples" / "configs").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (\S+)$", re.MULTILINE)
EXAMPLE_SECRETS = {
    "MCP_FHIR_EPIC_PRIVATE_KEY": "-----BEGIN PRIVATE KEY-----",
    "MCP_FHIR_ORACLE_CLIENT_SECRET": "example-secret",
    "MCP_FHIR_BP_CLIENT_SECRET": "example-secret",
    "MCP_FHIR_AUDIT_DSN": "postgresql://audit@127.0.0.1/audit",
    "MCP_FHIR_IDMAP_DSN": "postgresql://idmap@127.0.0.1/idmap",
}


def expected_key(path: Path) -> str:
    match = EXPECT.search(path.read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{path.name} has no '# expect: <key>' line")
    return match.group(1)


def test_the_corpus_holds_at_least_fifteen_bad_configs_each_naming_its_key():
    assert len(CORPUS) >= 15
    assert all(expected_key(p) for p in CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_config_check_rejects_a_bad_config_and_names_the_key(path: Path, capsys):
    status = main(["config", "check", str(path)])
    err = capsys.readouterr().err
    assert status == 2
    assert "[config_invalid]" in err
    key = expected_key(path)
    assert re.search(rf"\] {re.escape(key)}: ", err), f"{path.name}: expected key {key!r} in {err!r}"


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_loading_a_bad_config_raises_config_error_with_the_key(path: Path):
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.code == "config_invalid"
    assert caught.value.key == expected_key(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_config_passes_config_check_with_its_secrets_in_the_environment(
    path: Path, monkeypatch, capsys
):
    for name, value in EXAMPLE_SECRETS.items():
        monkeypatch.setenv(name, value)
    assert main(["config", "check", "--skip-files", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("ok: ")


def test_an_example_config_fails_when_a_secret_it_names_is_missing(monkeypatch, capsys):
    for name, value in EXAMPLE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MCP_FHIR_AUDIT_DSN")
    best_practice = REPO / "examples" / "configs" / "best-practice-au.yaml"
    assert main(["config", "check", "--skip-files", str(best_practice)]) == 2
    assert "] audit.dsn_env: " in capsys.readouterr().err


def test_a_missing_secret_env_var_is_reported_by_key_without_reading_other_values(tmp_path, monkeypatch):
    monkeypatch.setenv("MCP_FHIR_TEST_SET_SECRET", "value-that-must-not-leak")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "auth: {local: {id: dev}}\n"
        "backends:\n  ehr:\n    base_url: https://ehr.example.org/R4\n    smart:\n"
        "      client_id: c\n      auth_method: client_secret_basic\n"
        "      client_secret_env: MCP_FHIR_TEST_SET_SECRET\n"
        "opa: {token_env: MCP_FHIR_TEST_UNSET_TOKEN}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        config.load(cfg)
    assert caught.value.key == "opa.token_env"
    assert "value-that-must-not-leak" not in str(caught.value)


def test_a_missing_file_is_a_config_error_naming_the_option(tmp_path):
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path / "absent.yaml")
    assert caught.value.key == "--config"


def test_check_environment_accepts_a_config_whose_secrets_are_all_set():
    settings = config.from_mapping(
        {
            "auth": {"local": {"id": "dev"}},
            "backends": {"b": {"base_url": "http://127.0.0.1:1/fhir"}},
            "opa": {"token_env": "OPA_TOKEN_FOR_TEST"},
        }
    )
    config.check_environment(settings, {"OPA_TOKEN_FOR_TEST": "t"})
    with pytest.raises(ConfigError):
        config.check_environment(settings, {})


# ---- docs/configuration.md lists every key, with its default ------------------------------------------


def _default_text(value: object) -> str:
    if value is None or value is dataclasses.MISSING:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(map(str, value)) + "]" if value else "[]"
    if isinstance(value, dict):
        return "{…}" if value else "{}"
    return str(value)


def _pydantic_keys(model: type[Any], prefix: str, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    out = []
    for name, f in model.model_fields.items():
        if name not in skip:
            default = (
                "required" if f.is_required() else _default_text(f.get_default(call_default_factory=True))
            )
            out.append((prefix + name, default))
    return out


def _dataclass_keys(cls: type[Any], prefix: str, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    out = []
    for f in dataclasses.fields(cls):
        if f.name in (*skip, "prefix", "key_prefix"):
            continue
        if f.default is not dataclasses.MISSING:
            default = _default_text(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _default_text(f.default_factory())
        else:
            default = "required"
        out.append((prefix + f.name, default))
    return out


def reference_keys() -> list[tuple[str, str]]:
    """Every configuration key and its default, read from the settings models themselves."""
    from mcp_fhir.agent_auth.settings import AgentAuthSettings, ApiKeyEntry, JwksSettings, LocalIdentity
    from mcp_fhir.audit.settings import AuditSettings
    from mcp_fhir.ehr.smart import AdditionalKey, SmartSettings
    from mcp_fhir.resilience.breaker import BreakerSettings
    from mcp_fhir.resilience.cache import CacheSettings
    from mcp_fhir.resilience.ratelimit import RateLimiterSettings

    sections = ("server", "opa", "backends", "idmap", "limits", "auth", "audit", "cache", "rate_limit")
    return [
        *_pydantic_keys(config.Settings, "", skip=(*sections, "tools")),
        ("tools", "every tool"),
        *_pydantic_keys(config.ServerSettings, "server."),
        *_dataclass_keys(AgentAuthSettings, "auth.", skip=("jwks", "api_keys", "local")),
        ("auth.resource_server_url", "—"),
        *_dataclass_keys(JwksSettings, "auth.jwks."),
        *_dataclass_keys(ApiKeyEntry, "auth.api_keys[]."),
        *_dataclass_keys(LocalIdentity, "auth.local."),
        *_pydantic_keys(config.OpaDeploymentSettings, "opa."),
        *_pydantic_keys(config.BackendSettings, "backends.NAME.", skip=("smart", "breaker")),
        ("backends.NAME.breaker", "—"),
        *_dataclass_keys(BreakerSettings, "backends.NAME.breaker."),
        *_dataclass_keys(SmartSettings, "backends.NAME.smart.", skip=("additional_keys", "fhir_base_url")),
        *_dataclass_keys(AdditionalKey, "backends.NAME.smart.additional_keys[]."),
        *_pydantic_keys(config.IdMapSettings, "idmap."),
        *_dataclass_keys(AuditSettings, "audit."),
        ("cache.enabled", "true"),
        *_dataclass_keys(CacheSettings, "cache."),
        *_dataclass_keys(RateLimiterSettings, "rate_limit.", skip=("limits",)),
        *_pydantic_keys(config.LimitsSettings, "limits."),
    ]


def test_docs_configuration_lists_every_key_with_its_true_default():
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[1].replace("`", "")
    problems = []
    for key, default in reference_keys():
        if key not in rows:
            problems.append(f"{key}: not documented")
        elif rows[key] != default:
            problems.append(f"{key}: documented default {rows[key]!r}, model says {default!r}")
    assert not problems, "\n".join(problems)


def test_docs_configuration_documents_no_key_the_models_do_not_have():
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", doc, re.MULTILINE))
    assert documented - {k for k, _ in reference_keys()} == set()
