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
    from mcp_fhir.tracing import TracingSettings

    sections = (
        "server",
        "opa",
        "backends",
        "idmap",
        "limits",
        "auth",
        "audit",
        "cache",
        "rate_limit",
        "consent",
        "activity",
        "tracing",
    )
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
        *_pydantic_keys(config.ConsentSettings, "consent."),
        *_pydantic_keys(config.ActivitySettings, "activity."),
        *_dataclass_keys(TracingSettings, "tracing."),
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


# ---- one settings model: typed sections, built once -----------------------------------------------


def test_every_section_is_typed_at_load_and_the_accessors_return_the_same_objects():
    from mcp_fhir.agent_auth.settings import AgentAuthSettings
    from mcp_fhir.audit.settings import AuditSettings
    from mcp_fhir.ehr.smart import SmartSettings
    from mcp_fhir.resilience.breaker import BreakerSettings
    from mcp_fhir.resilience.cache import CacheSettings
    from mcp_fhir.resilience.ratelimit import RateLimiterSettings

    settings = config.from_mapping(
        {
            "server": {"transport": "http"},
            "auth": {"issuer": "https://login.example.org"},
            "backends": {
                "ehr": {
                    "base_url": "https://ehr.example.org/R4",
                    "rate_limit_per_minute": 60,
                    "breaker": {"failure_threshold": 2},
                    "smart": {
                        "client_id": "c",
                        "auth_method": "client_secret_basic",
                        "client_secret_env": "X",
                    },
                }
            },
        }
    )
    assert isinstance(settings.auth, AgentAuthSettings) and settings.agent_auth() is settings.auth
    assert settings.auth.audience == "http://127.0.0.1:8765/mcp"  # defaulted to the canonical URI
    assert isinstance(settings.audit, AuditSettings) and settings.audit_settings() is settings.audit
    assert isinstance(settings.cache, CacheSettings) and settings.cache_settings() is settings.cache
    assert isinstance(settings.rate_limit, RateLimiterSettings)
    assert settings.rate_limit_settings() is settings.rate_limit
    assert settings.rate_limit.limits["ehr"].requests_per_minute == 60
    smart = settings.smart_settings("ehr")
    assert isinstance(smart, SmartSettings) and smart is settings.backends["ehr"].smart
    assert smart.prefix == "backends.ehr.smart" and smart.fhir_base_url == "https://ehr.example.org/R4"
    assert isinstance(settings.backends["ehr"].breaker, BreakerSettings)


def test_a_disabled_cache_is_none_and_its_other_keys_are_still_checked():
    base = {"auth": {"local": {"id": "dev"}}, "backends": {"b": {"base_url": "http://127.0.0.1:1/fhir"}}}
    assert config.from_mapping({**base, "cache": {"enabled": False}}).cache_enabled is False
    with pytest.raises(ConfigError) as caught:
        config.from_mapping({**base, "cache": {"enabled": False, "max_entries": 0}})
    assert caught.value.key == "cache.max_entries"


@pytest.mark.parametrize(
    ("section", "expected_key"),
    [
        ({"breaker": {"failure_threshold": 0}}, "backends.ehr.breaker.failure_threshold"),
        ({"breaker": {"colour": 1}}, "backends.ehr.breaker.colour"),
        ({"smart": {"client_id": "c", "auth_method": "nope"}}, "backends.ehr.smart.auth_method"),
        ({"smart": "not a mapping"}, "backends.ehr.smart"),
    ],
)
def test_an_error_in_a_nested_section_names_its_full_key(section, expected_key):
    with pytest.raises(ConfigError) as caught:
        config.from_mapping(
            {
                "auth": {"local": {"id": "dev"}},
                "backends": {"ehr": {"base_url": "https://ehr.example.org/R4", **section}},
            }
        )
    assert caught.value.key == expected_key


# ---- every error in a file ------------------------------------------------------------------------

THREE_ERRORS = """\
server: {port: 0}
auth: {local: {id: dev}, leeway_seconds: -1}
backends:
  ehr: {base_url: "ftp://ehr.example.org"}
"""


def test_loading_a_file_with_three_errors_reports_all_three_by_key(tmp_path):
    path = tmp_path / "three.yaml"
    path.write_text(THREE_ERRORS, encoding="utf-8")
    with pytest.raises(config.ConfigErrors) as caught:
        config.load(path)
    keys = [e.key for e in caught.value.errors]
    assert keys == ["server.port", "auth.leeway_seconds", "backends.ehr.base_url"]
    assert all(e.code == "config_invalid" for e in caught.value.errors)


def test_config_check_prints_every_error_of_a_file_one_per_line(tmp_path, capsys):
    path = tmp_path / "three.yaml"
    path.write_text(THREE_ERRORS, encoding="utf-8")
    assert main(["config", "check", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1].split(":", 1)[0] for line in lines] == [
        "server.port",
        "auth.leeway_seconds",
        "backends.ehr.base_url",
    ]
    assert all(line.startswith("error: [config_invalid] ") for line in lines)


def test_every_inline_secret_and_every_unset_variable_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv("T_UNSET_ONE", raising=False)
    monkeypatch.delenv("T_UNSET_TWO", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(
        "auth: {local: {id: dev}}\n"
        "backends: {ehr: {base_url: 'http://127.0.0.1:1/fhir'}}\n"
        "opa: {url: 'http://127.0.0.1:8181', token_env: T_UNSET_ONE}\n"
        "idmap: {kind: postgres, dsn_env: T_UNSET_TWO}\n",
        encoding="utf-8",
    )
    with pytest.raises(config.ConfigErrors) as caught:
        config.load(path, files=False)
    assert [e.key for e in caught.value.errors] == ["opa.token_env", "idmap.dsn_env"]


# ---- relative paths are read from the config file's folder ---------------------------------------


def _write_local_config(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sidecar.yaml"
    path.write_text(
        "auth: {local: {id: dev}}\n"
        "backends: {ehr: {base_url: 'http://127.0.0.1:1/fhir'}}\n"
        "opa: {policies: rego, decision_log: var/decisions.log}\n"
        "idmap: {path: var/idmap.db, seed_file: seed.yaml}\n"
        "audit: {sink: file, path: var/audit/audit.jsonl, signing_key_file: keys/audit.pem}\n" + extra,
        encoding="utf-8",
    )
    (folder / "rego").mkdir(exist_ok=True)
    (folder / "seed.yaml").write_text("[]\n", encoding="utf-8")
    return path


def test_relative_paths_in_a_config_are_resolved_against_its_own_folder(tmp_path, monkeypatch):
    path = _write_local_config(tmp_path / "deploy")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    settings = config.load(path)
    folder = (tmp_path / "deploy").absolute()
    assert settings.opa.policies == folder / "rego"
    assert settings.opa.decision_log == folder / "var" / "decisions.log"
    assert settings.idmap.path == folder / "var" / "idmap.db"
    assert settings.idmap.seed_file == folder / "seed.yaml"
    assert settings.audit.path == str(folder / "var" / "audit" / "audit.jsonl")
    assert settings.audit.signing_key_path == folder / "keys" / "audit.pem"


def test_a_config_named_by_the_environment_variable_resolves_against_its_own_folder(tmp_path, monkeypatch):
    path = _write_local_config(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(config.DEFAULT_CONFIG_ENV, str(path.relative_to(tmp_path)))
    settings = config.load()
    assert settings.opa.policies == (tmp_path / "elsewhere" / "rego").absolute()


def test_absolute_paths_and_unwritten_defaults_are_left_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(
        f"auth: {{local: {{id: dev}}}}\nbackends: {{ehr: {{base_url: 'http://127.0.0.1:1/fhir'}}}}\n"
        f"opa: {{url: 'http://127.0.0.1:8181'}}\nidmap: {{path: {tmp_path / 'abs.db'}}}\n",
        encoding="utf-8",
    )
    settings = config.load(path, files=False)
    assert settings.idmap.path == tmp_path / "abs.db"
    assert settings.opa.policies == Path("policies")
    assert settings.server.path == "/mcp"


def test_the_shipped_stdio_example_passes_the_full_check_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = config.load(REPO / "examples" / "configs" / "testbed-stdio.yaml")
    assert settings.opa.policies == REPO / "policies"


# ---- config check fails on whatever makes serve fail at start -------------------------------------


def _pem_pair(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, for the TLS checks."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize(
    ("extra", "setup", "expected_key"),
    [
        ("", lambda d: (d / "rego").rmdir(), "opa.policies"),
        ("", lambda d: (d / "seed.yaml").unlink(), "idmap.seed_file"),
        ("", lambda d: (d / "seed.yaml").write_text("{not: a list}\n"), "idmap.seed_file"),
        (
            "server: {tls_cert_file: absent.crt, tls_key_file: absent.key}\n",
            lambda d: None,
            "server.tls_cert_file",
        ),
        (
            "server: {tls_cert_file: server.crt, tls_key_file: other.key}\n",
            "mismatched-tls",
            "server.tls_cert_file",
        ),
        (
            "backends: {ehr: {base_url: 'https://ehr.example.org/R4', ca_bundle: ca.pem}}\n",
            lambda d: (d / "ca.pem").write_text("not a certificate\n"),
            "backends.ehr.ca_bundle",
        ),
        (
            "backends: {ehr: {base_url: 'https://ehr.example.org/R4', hl7v2_results_dir: hl7}}\n",
            lambda d: None,
            "backends.ehr.hl7v2_results_dir",
        ),
        (
            "backends: {ehr: {base_url: 'https://ehr.example.org/R4', smart: {client_id: c, "
            "token_url: 'https://ehr.example.org/token', private_key_file: smart.pem, key_id: k1}}}\n",
            lambda d: (d / "smart.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n"),
            "backends.ehr.smart.private_key_file",
        ),
        (
            "backends: {ehr: {base_url: 'https://ehr.example.org/R4', smart: {client_id: c, "
            "auth_method: client_secret_basic, client_secret_file: absent.txt}}}\n",
            lambda d: None,
            "backends.ehr.smart.client_secret_file",
        ),
        (
            "",
            lambda d: (d / "keys").mkdir() or (d / "keys" / "audit.pem").mkdir(),
            "audit.signing_key_file",
        ),
    ],
    ids=[
        "policies-folder-missing",
        "seed-missing",
        "seed-malformed",
        "tls-files-missing",
        "tls-key-not-the-cert-key",
        "ca-bundle-not-pem",
        "hl7-folder-missing",
        "smart-key-unreadable",
        "smart-secret-file-missing",
        "signing-key-is-a-folder",
    ],
)
def test_config_check_fails_on_what_would_stop_serve_at_start(tmp_path, capsys, extra, setup, expected_key):
    folder = tmp_path / "deploy"
    lines = extra.splitlines(keepends=True)
    path = _write_local_config(folder)
    if extra:  # the extra section replaces the file's own section of that name
        text = path.read_text(encoding="utf-8").splitlines(keepends=True)
        replaced = {line.split(":", 1)[0] for line in lines}
        path.write_text(
            "".join(line for line in text if line.split(":", 1)[0] not in replaced) + "".join(lines),
            encoding="utf-8",
        )
    if setup == "mismatched-tls":
        _pem_pair(folder)
        (folder / "other").mkdir()
        (folder / "other.key").write_bytes(_pem_pair(folder / "other")[1].read_bytes())
        _pem_pair(folder)  # a fresh pair: server.key now differs from other.key
    else:
        setup(folder)
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"] {expected_key}: " in err, err
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert expected_key in [e.key for e in caught.value.errors]


def test_config_check_fails_when_no_opa_binary_can_be_found_for_a_managed_opa(tmp_path, monkeypatch, capsys):
    from mcp_fhir.policy import managed_opa

    path = _write_local_config(tmp_path / "deploy")
    monkeypatch.setattr(managed_opa, "_PROJECT_OPA", tmp_path / "no-opa")
    monkeypatch.delenv("MCP_FHIR_OPA", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["config", "check", str(path)]) == 2
    assert "] opa.binary: " in capsys.readouterr().err


def test_config_check_passes_a_complete_local_config_and_skip_files_skips_the_file_checks(tmp_path, capsys):
    path = _write_local_config(tmp_path / "deploy")
    assert main(["config", "check", str(path)]) == 0, capsys.readouterr().err
    (tmp_path / "deploy" / "rego").rmdir()
    assert main(["config", "check", "--skip-files", str(path)]) == 0
    assert main(["config", "check", str(path)]) == 2


def test_config_check_fails_when_the_managed_opa_policies_do_not_compile(tmp_path, capsys):
    path = _write_local_config(tmp_path / "deploy")
    (tmp_path / "deploy" / "rego" / "broken.rego").write_text(
        "package broken\n\nallow if {\n", encoding="utf-8"
    )
    (tmp_path / "deploy" / "rego" / "ignored_test.rego").write_text("not rego at all\n", encoding="utf-8")
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "] opa.policies: the policies do not compile: " in err
    (tmp_path / "deploy" / "rego" / "broken.rego").write_text(
        "package broken\n\nallow := true\n", encoding="utf-8"
    )
    assert main(["config", "check", str(path)]) == 0, capsys.readouterr().err


def test_a_backend_time_zone_must_be_an_iana_name():
    base = {"auth": {"local": {"id": "dev"}}}
    config.from_mapping(
        {
            **base,
            "backends": {"gp": {"base_url": "http://127.0.0.1:1/fhir", "timezone": "Australia/Brisbane"}},
        }
    )
    with pytest.raises(ConfigError) as caught:
        config.from_mapping(
            {**base, "backends": {"gp": {"base_url": "http://127.0.0.1:1/fhir", "timezone": "Mars/Olympus"}}}
        )
    assert caught.value.key == "backends.gp.timezone"


def test_the_audit_key_history_witness_and_writer_state_paths_are_read_from_the_config_files_folder(tmp_path):
    from mcp_fhir.config import resolve_paths

    data = {
        "audit": {
            "public_key_files": ["keys/a.pem.pub", "/abs/b.pem.pub"],
            "witness_path": "witness/head",
            "writer_state_dir": "state",
        }
    }
    resolved = resolve_paths(data, tmp_path / "conf")["audit"]
    assert resolved["public_key_files"] == [str(tmp_path / "conf" / "keys" / "a.pem.pub"), "/abs/b.pem.pub"]
    assert resolved["witness_path"] == str(tmp_path / "conf" / "witness" / "head")
    assert resolved["writer_state_dir"] == str(tmp_path / "conf" / "state")
