"""The Python tool catalogue and the policy's tool catalogue are one contract: they must agree."""

from pathlib import Path

import yaml

from mcp_fhir.catalog import CATALOGUE

POLICY_TOOLS = (
    Path(__file__).resolve().parents[1] / "policies" / "mcp_fhir" / "config" / "tools" / "data.yaml"
)


def test_every_tool_in_python_is_in_the_policy_catalogue_with_the_same_operation_and_types():
    policy = yaml.safe_load(POLICY_TOOLS.read_text())
    assert set(policy) == set(CATALOGUE)
    for name, (operation, types) in CATALOGUE.items():
        assert policy[name]["operation"] == operation, name
        assert sorted(policy[name]["resource_types"]) == sorted(types), name


def test_every_registered_tool_is_in_the_catalogue():
    from mcp_fhir import config
    from mcp_fhir.server import build_server

    settings = config.from_mapping(
        {"backends": {"x": {"base_url": "http://127.0.0.1:9/fhir"}}, "auth": {"local": {"id": "t"}}}
    )
    server = build_server(settings)
    registered = {t.name for t in server._tool_manager.list_tools()}
    assert registered == set(CATALOGUE)
