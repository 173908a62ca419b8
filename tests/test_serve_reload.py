"""`http_app.reload` (what SIGHUP runs): new API keys from the config file, a refused file changes nothing,
and the sections only a restart applies are named. Over a real `serve` process:
`tests/integration/test_serve_operations.py`."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from mcp_fhir import config
from mcp_fhir.agent_auth.api_keys import ApiKeyStore
from mcp_fhir.agent_auth.errors import AgentAuthError
from mcp_fhir.agent_auth.verifier import AgentTokenVerifier
from mcp_fhir.http_app import ServeState, reload, restart_only_changes
from tests.integration._ops_harness import ApiKeyIdentity, http_config
from tests.testbed.sidecar import NURSE

FHIR = "http://127.0.0.1:8103/fhir"
_T0 = datetime(2026, 12, 7, 10, tzinfo=UTC)


@pytest.fixture
def keys() -> tuple[ApiKeyIdentity, ApiKeyIdentity]:
    return ApiKeyIdentity(NURSE), ApiKeyIdentity({**NURSE, "id": "agent-nurse-rotated"})


def write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def running(
    tmp_path: Path, old: ApiKeyIdentity
) -> tuple[Any, ServeState, AgentTokenVerifier, dict[str, Any]]:
    cfg = http_config(tmp_path, FHIR, [old])
    path = write(tmp_path / "mcp-fhir.yaml", cfg)
    settings = config.load(path)
    verifier = AgentTokenVerifier(None, ApiKeyStore(settings.agent_auth().api_keys))
    server = SimpleNamespace(ops={"token_verifier": verifier}, app_holder={})
    return server, ServeState(settings, config_path=str(path)), verifier, cfg


async def test_a_reload_swaps_in_the_files_api_keys(tmp_path, keys):
    old, new = keys
    server, state, verifier, cfg = running(tmp_path, old)
    assert (await verifier.authenticate(old.key)).id == old.id
    write(Path(state.config_path), {**cfg, "auth": {"api_keys": [new.entry]}})
    assert await reload(server, state) is True
    assert (await verifier.authenticate(new.key)).id == new.id
    with pytest.raises(AgentAuthError) as caught:
        await verifier.authenticate(old.key)
    assert caught.value.reason == "api_key_unknown"
    assert state.reloads == 1 and [k.id for k in state.settings.agent_auth().api_keys] == [new.id]


@pytest.mark.parametrize(
    "text", ["server: [unclosed\n", "no_such_section: {}\n", "auth: {api_keys: [{id: x, hash: nothex}]}\n"]
)
async def test_a_file_that_does_not_validate_is_refused_and_changes_nothing(tmp_path, keys, text, caplog):
    old, _ = keys
    server, state, verifier, _ = running(tmp_path, old)
    before = state.settings
    Path(state.config_path).write_text(text, encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="mcp_fhir.serve"):
        assert await reload(server, state) is False
    assert "reload refused" in caplog.text
    assert state.settings is before and state.reloads == 0
    assert (await verifier.authenticate(old.key)).id == old.id


def test_only_changes_a_reload_cannot_apply_are_named(tmp_path, keys):
    old, new = keys
    cfg = http_config(tmp_path, FHIR, [old])
    base = config.from_mapping(cfg)
    assert restart_only_changes(base, base) == []
    rotated = config.from_mapping({**cfg, "auth": {"api_keys": [new.entry]}})
    assert restart_only_changes(base, rotated) == []  # keys are reloaded, not a restart
    revision = config.from_mapping({**cfg, "opa": {**cfg["opa"], "expected_revision": "r2"}})
    assert restart_only_changes(base, revision) == []  # so is the expected revision
    moved = config.from_mapping({**cfg, "server": {**cfg["server"], "port": cfg["server"]["port"] + 1}})
    assert restart_only_changes(base, moved) == ["server"]
    jwt = config.from_mapping({**cfg, "auth": {**cfg["auth"], "issuer": "https://login.example.org"}})
    assert restart_only_changes(base, jwt) == ["auth (other than api_keys)"]


async def test_a_reload_forgets_every_cached_decision(tmp_path, keys, monkeypatch):
    from mcp_fhir import http_app
    from mcp_fhir.audit.fake import FakeAuditTrail
    from mcp_fhir.policy.decide import Decider, DecisionCache
    from mcp_fhir.policy.engine import Decision, FakePolicyEngine

    async def no_build_info(*_args: Any) -> None:
        return None

    monkeypatch.setattr(http_app, "publish_build_info", no_build_info)
    server, state, _verifier, _cfg = running(tmp_path, keys[0])
    cache = DecisionCache()
    decider = Decider(FakePolicyEngine(), audit=FakeAuditTrail().record, cache=cache)
    cache.put("key", Decision(allow=False, decision_id="d", valid_for_s=60), _T0)
    server.app_holder["app"] = SimpleNamespace(decider=decider, engine=decider.engine)
    assert await reload(server, state) is True
    assert len(cache) == 0
