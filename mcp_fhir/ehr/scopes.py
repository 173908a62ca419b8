"""Least-privilege SMART system scopes for the enabled tools, and which tools a grant leaves out.

The catalogue (owned by ``mcp_fhir/tools/catalog.py``) maps each tool to the FHIR operation it performs
and the resource types it touches::

    Catalogue = Mapping[tool_name, (operation, (resource_type, ...))]
    operation: read | search | create | update | delete

Each (operation, type) pair needs one permission. SMART v1 grants whole-type ``read`` / ``write``;
SMART v2 grants the letters c, r, u, d, s (in that order):

    operation   v1       v2
    read        read     r
    search      read     rs    (a search returns resources, so it needs read too)
    create      write    c
    update      write    u
    delete      write    d

``required_scopes`` merges per resource type (v2 ``Observation.r`` + ``Observation.s`` -> ``Observation.rs``)
and returns a sorted list. Types served locally (``AuditEvent``) are never requested from the EHR.

``unavailable_tools`` reads what the EHR actually granted, understanding both syntaxes, v1 ``read`` /
``write`` / ``*``, v2 letter sets (``rs`` covers ``r`` and ``s``), ``system/*.xxx`` type wildcards and
v2 query-restricted scopes (``?category=...``, which grant only part of a type and so do not count as
covering the whole type). This module decides only "is the permission present"; who may use a tool is
policy, in Rego.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from mcp_fhir._exceptions import ConfigError

__all__ = [
    "LOCAL_RESOURCE_TYPES",
    "Catalogue",
    "ScopeSyntax",
    "required_scopes",
    "scope_covers",
    "unavailable_tools",
]

ScopeSyntax = Literal["v1", "v2"]
Catalogue = Mapping[str, tuple[str, tuple[str, ...]]]

LOCAL_RESOURCE_TYPES: frozenset[str] = frozenset({"AuditEvent"})
_CONTEXT = "system"
_V2_ORDER = "cruds"
# A search returns resources, so it needs read as well as search (v2 "rs", as the SMART examples ask).
_V2_LETTERS: Mapping[str, str] = {"read": "r", "search": "rs", "create": "c", "update": "u", "delete": "d"}
_V1_AS_LETTERS: Mapping[str, str] = {"read": "rs", "write": "cud", "*": "cruds"}


def _needs(tools: Iterable[str], catalogue: Catalogue, *, key: str) -> dict[str, dict[str, set[str]]]:
    """tool -> resource type -> set of v2 letters it needs (EHR types only)."""
    out: dict[str, dict[str, set[str]]] = {}
    for tool in tools:
        entry = catalogue.get(tool)
        if entry is None:
            raise ConfigError(key, f"names an unknown tool '{tool}'")
        operation, types = entry
        letters = _V2_LETTERS.get(operation)
        if letters is None:
            raise ConfigError(key, f"tool '{tool}' has an unknown operation")
        per_type = out.setdefault(tool, {})
        for resource_type in types:
            if resource_type in LOCAL_RESOURCE_TYPES:
                continue
            per_type.setdefault(resource_type, set()).update(letters)
    return out


def _render(resource_type: str, letters: set[str], syntax: ScopeSyntax) -> list[str]:
    if syntax == "v2":
        ordered = "".join(ch for ch in _V2_ORDER if ch in letters)
        return [f"{_CONTEXT}/{resource_type}.{ordered}"]
    words = sorted({"read" if ch in "rs" else "write" for ch in letters})
    return [f"{_CONTEXT}/{resource_type}.{word}" for word in words]


def required_scopes(
    tool_names: Iterable[str],
    *,
    syntax: ScopeSyntax,
    catalogue: Catalogue,
    key: str = "tools.enabled",
) -> list[str]:
    """The least set of ``system/`` scopes that lets every named tool work, sorted."""
    if syntax not in ("v1", "v2"):
        raise ConfigError("smart.scope_syntax", "must be 'v1' or 'v2'")
    merged: dict[str, set[str]] = {}
    for per_type in _needs(tool_names, catalogue, key=key).values():
        for resource_type, letters in per_type.items():
            merged.setdefault(resource_type, set()).update(letters)
    scopes: list[str] = []
    for resource_type in sorted(merged):
        scopes.extend(_render(resource_type, merged[resource_type], syntax))
    return sorted(scopes)


def _granted_letters(scope: str) -> tuple[str, str] | None:
    """Parse one granted scope into (resource type or '*', v2 letters), or None if it grants nothing here."""
    if "?" in scope:
        return None  # a query-restricted v2 scope covers only part of a type
    context, _, rest = scope.partition("/")
    if context != _CONTEXT or not rest:
        return None
    resource_type, dot, permission = rest.partition(".")
    if not dot or not resource_type:
        return None
    if permission in _V1_AS_LETTERS:
        return resource_type, _V1_AS_LETTERS[permission]
    if permission and all(ch in _V2_ORDER for ch in permission):
        return resource_type, permission
    return None


def scope_covers(granted: Iterable[str], resource_type: str, letter: str) -> bool:
    """True when some granted scope allows the v2 permission ``letter`` on ``resource_type``."""
    for scope in granted:
        parsed = _granted_letters(scope)
        if parsed is None:
            continue
        granted_type, letters = parsed
        if granted_type in ("*", resource_type) and letter in letters:
            return True
    return False


def unavailable_tools(
    enabled: Iterable[str],
    granted_scopes: Iterable[str],
    syntax: ScopeSyntax,
    catalogue: Catalogue,
) -> dict[str, list[str]]:
    """tool -> the scopes (in ``syntax``) it still needs, for every enabled tool the grant does not cover."""
    granted = list(granted_scopes)
    missing: dict[str, list[str]] = {}
    for tool, per_type in _needs(enabled, catalogue, key="tools.enabled").items():
        lacking: list[str] = []
        for resource_type in sorted(per_type):
            absent = {ch for ch in per_type[resource_type] if not scope_covers(granted, resource_type, ch)}
            if absent:
                lacking.extend(_render(resource_type, absent, syntax))
        if lacking:
            missing[tool] = sorted(lacking)
    return missing
