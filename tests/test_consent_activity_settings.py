"""Settings for consent and activity (issue #21 §1, §3): off by default, checked at load, and the EHR
consent source's own SMART scope requested only when consent is read from the EHR."""

from __future__ import annotations

from typing import Any

import pytest

from mcp_fhir import config
from mcp_fhir.backends import smart_scopes
from mcp_fhir.config import ConfigErrors

BASE: dict[str, Any] = {
    "backends": {"ehr": {"base_url": "https://ehr.example/fhir"}},
    "auth": {"local": {"id": "agent", "claims": {}, "scopes": []}},
}
TOOLS = ("search_observations", "create_clinical_note", "search_audit_log")


def _load(**sections: Any) -> config.Settings:
    return config.from_mapping({**BASE, **sections})


def test_consent_and_activity_are_off_by_default():
    s = _load()
    assert (s.consent.enabled, s.consent.source, s.consent.ttl_seconds) == (False, "sqlite", 60.0)
    assert (s.activity.enabled, s.activity.store, s.activity.windows) == (False, "memory", (60, 600))


def test_a_postgres_consent_store_needs_its_dsn_variable():
    with pytest.raises(ConfigErrors) as err:
        _load(consent={"enabled": True, "source": "postgres"})
    assert err.value.key == "consent.dsn_env"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"source": "fax"}, "consent.source"),
        ({"ttl_seconds": -1}, "consent.ttl_seconds"),
        ({"table": "x; drop"}, "consent.table"),
        ({"surprise": 1}, "consent.surprise"),
    ],
)
def test_a_bad_consent_setting_is_named_by_its_key(section: dict[str, Any], key: str):
    with pytest.raises(ConfigErrors) as err:
        _load(consent=section)
    assert err.value.key == key


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"enabled": True, "store": "redis"}, "activity.redis_url_env"),
        ({"enabled": True, "store": "redis", "redis_url_env": "R"}, "activity.patient_key_env"),
        ({"windows": [0]}, "activity.windows"),
        ({"windows": []}, "activity.windows"),
    ],
)
def test_a_bad_activity_setting_is_named_by_its_key(section: dict[str, Any], key: str):
    with pytest.raises(ConfigErrors) as err:
        _load(activity=section)
    assert err.value.key == key


def test_activity_windows_are_kept_sorted_once_each():
    assert _load(activity={"windows": [600, 60, 600]}).activity.windows == (60, 600)


def test_a_relative_consent_path_is_read_from_the_files_folder(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(
        "backends: {ehr: {base_url: 'https://ehr.example/fhir'}}\nconsent: {path: var/consent.db}\n"
        "auth: {local: {id: agent, claims: {}, scopes: []}}\n",
        encoding="utf-8",
    )
    assert config.load(file, files=False).consent.path == tmp_path / "var" / "consent.db"


@pytest.mark.parametrize(("syntax", "scope"), [("v2", "system/Consent.rs"), ("v1", "system/Consent.read")])
def test_the_consent_scope_is_requested_only_when_consent_is_read_from_the_ehr(syntax: str, scope: str):
    assert scope in smart_scopes(TOOLS, syntax, consent_from_ehr=True)
    assert not any("Consent" in s for s in smart_scopes(TOOLS, syntax))
