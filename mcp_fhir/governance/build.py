"""Lookup tables derived from the policy's YAML data, built before the bundle (`mcp-fhir policy build`).

The Rego reads these tables with one lookup by an input value (`derived.scopes[raw]`) instead of
recomputing the same facts from the YAML on every decision. The output is a checked-in data file,
`policies/mcp_fhir/derived/data.json` (`data.mcp_fhir.derived`); `policy build --check` (run in CI)
fails when it no longer matches the YAML.

Each table records the YAML it was derived from (`derived.source`); the policy uses a table only
while its source equals the live data (one comparison), so a stale file, or a test that replaces
data with `with data.mcp_fhir.config... as ...`, falls back to the computation from the YAML and
never changes a decision.

* `labels`: every label withheld by default, sorted (the closed obligations' list).
* `label_set`: the same labels as the keys of an object (`object.keys` gives the set in one step).
* `hours`: the business days as an object (`kind`: day -> "business", the key of `left`), and by
  local `[hour][minute]` (as `time.clock` gives them): whether that minute is inside business hours,
  and the seconds left to the next boundary (`valid_for_s`).
* `scopes`: every SMART scope string without a query (`[ctx/]Type.perm`, v1 and v2, for each
  resource type the data names and `*`) -> its parse, as `scopes.parse` gives it. A scope not in
  the table (a query, another type) is parsed at decision time.
* `tools`: operation -> resource type -> the tool names with that operation and type.
* `operations`: access kind -> the operations of that kind (`defaults.access` inverted).
* `visible`: role -> purpose -> what visible_tools needs of each grant the role holds under that
  purpose (`rbac.grants`, each access kind expanded to its operations): `[resource type, scope
  letter, tool names]`, sorted, for each operation and type that some tool has.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mcp_fhir._exceptions import ConfigError

__all__ = [
    "DERIVED_PATH",
    "build_derived",
    "check_derived",
    "derived_tables",
    "load_config",
    "run_build",
    "write_derived",
]

DERIVED_PATH = Path("mcp_fhir") / "derived" / "data.json"
CONFIG_PATH = Path("mcp_fhir") / "config"
SCOPE_CONTEXTS = ("", "patient/", "user/", "system/")
V2_LETTERS = "cruds"
# The config sections each table depends on (the freshness guard compares exactly these).
SOURCES = {
    "labels": ("labels",),
    "label_set": ("labels",),
    "hours": ("hours",),
    "scopes": ("defaults",),
    "tools": ("tools",),
    "operations": ("defaults",),
    "visible": ("defaults", "purposes", "roles", "tools"),
}


def load_config(policies: Path) -> dict[str, Any]:
    """`data.mcp_fhir.config` as OPA loads it: one section per `config/<section>/data.yaml`."""
    root = policies / CONFIG_PATH
    if not root.is_dir():
        raise ConfigError("policy.build", f"no {CONFIG_PATH} folder under the policies folder")
    config: dict[str, Any] = {}
    for path in sorted(root.glob("*/data.yaml")):
        try:
            config[path.parent.name] = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError("policy.build", f"{path.parent.name}/data.yaml is not valid YAML") from exc
    return config


def _minute(hhmm: str) -> int:
    hours, _, minutes = str(hhmm).partition(":")
    return int(hours) * 60 + int(minutes)


def _hours_table(hours: Mapping[str, Any]) -> dict[str, Any]:
    """Business hours by local [hour][minute]: inside them (on a business day), and the seconds left
    from hh:mm:00 to the next boundary less one (end of hours, start later today, else midnight)."""
    start, end = _minute(hours.get("start", "00:00")), _minute(hours.get("end", "00:00"))

    def left(minute: int, business: bool) -> int:
        if business and start <= minute < end:
            boundary = end
        elif business and minute < start:
            boundary = start
        else:
            boundary = 24 * 60
        return (boundary - minute) * 60 - 1

    return {
        "kind": {str(day): "business" for day in hours.get("days") or []},
        "in_hours": [[start <= h * 60 + m < end for m in range(60)] for h in range(24)],
        "left": {
            kind: [[left(h * 60 + m, kind == "business") for m in range(60)] for h in range(24)]
            for kind in ("business", "other")
        },
    }


def _resource_types(config: Mapping[str, Any]) -> list[str]:
    types: set[str] = set()
    for tool in (config.get("tools") or {}).values():
        types.update(tool.get("resource_types") or [])
    for role in (config.get("roles") or {}).values():
        types.update(role.get("read") or [])
        types.update(role.get("write") or [])
    for purpose in (config.get("purposes") or {}).values():
        types.update(purpose.get("resource_types") or {})
    return sorted(types)


def _v2_permissions() -> list[str]:
    """Every non-empty subsequence of "cruds", letters in order (what the scope regex accepts)."""
    perms: list[str] = []
    for n in range(1, len(V2_LETTERS) + 1):
        perms.extend("".join(c) for c in itertools.combinations(V2_LETTERS, n))
    return perms


def _scope_table(config: Mapping[str, Any]) -> dict[str, Any]:
    v1 = (config.get("defaults") or {}).get("scope_v1") or {}
    table: dict[str, Any] = {}
    for ctx, rtype in itertools.product(SCOPE_CONTEXTS, [*_resource_types(config), "*"]):
        context = ctx.rstrip("/")
        for perm in [*v1, *_v2_permissions()]:
            letters = sorted(set(v1[perm])) if perm in v1 else sorted(set(perm))
            table[f"{ctx}{rtype}.{perm}"] = {
                "context": context,
                "type": rtype,
                "letters": letters,
                "categories": None,
            }
    return table


def _tool_table(config: Mapping[str, Any]) -> dict[str, Any]:
    table: dict[str, dict[str, list[str]]] = {}
    for name, tool in sorted((config.get("tools") or {}).items()):
        for rtype in tool.get("resource_types") or []:
            table.setdefault(str(tool.get("operation")), {}).setdefault(str(rtype), []).append(name)
    return table


def _operations(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """Access kind -> the tool operations of that kind (the inverse of defaults.access)."""
    table: dict[str, list[str]] = {}
    for operation, access in sorted(((config.get("defaults") or {}).get("access") or {}).items()):
        table.setdefault(str(access), []).append(str(operation))
    return table


def _visible_table(config: Mapping[str, Any]) -> dict[str, dict[str, list[list[Any]]]]:
    """Role -> purpose -> [type, letter, tool names] per grant, as visible_tools reads rbac.grants: the
    role permits the access on the type and lists the purpose, and that purpose (defined) covers the
    access and type (a `false` entry is no entry, as in Rego); each operation of that access that has
    a scope letter and some tool for the type gives one entry."""
    purposes = config.get("purposes") or {}
    letters = (config.get("defaults") or {}).get("scope_letter") or {}
    operations = _operations(config)
    tools = _tool_table(config)
    table: dict[str, dict[str, list[list[Any]]]] = {}
    for name, role in sorted((config.get("roles") or {}).items()):
        if not isinstance(role, Mapping):
            continue
        by_purpose: dict[str, list[list[Any]]] = {}
        for purpose in role.get("purposes") or []:
            definition = purposes.get(purpose)
            if not isinstance(definition, Mapping):
                continue
            types = definition.get("resource_types") or {}
            grants = {
                (operation, str(rtype))
                for access in definition.get("access") or []
                for rtype in role.get(access) or []
                if rtype in types and types[rtype] is not False
                for operation in operations.get(str(access), [])
            }
            entries = [
                [rtype, letters[operation], tools[operation][rtype]]
                for operation, rtype in sorted(grants)
                if operation in letters and rtype in tools.get(operation, {})
            ]
            by_purpose[str(purpose)] = sorted(entries, key=lambda e: json.dumps(e, sort_keys=True))
        table[str(name)] = by_purpose
    return table


def derived_tables(config: Mapping[str, Any]) -> dict[str, Any]:
    """The derived tables for one `data.mcp_fhir.config`, with the sources they came from."""
    labels = config.get("labels") or {}
    hours = config.get("hours") or {}
    sections = sorted({s for names in SOURCES.values() for s in names})
    withheld = sorted(set(labels.get("sensitivity") or []) | set(labels.get("confidentiality") or []))
    return {
        "source": {section: config.get(section) for section in sections},
        "labels": withheld,
        "label_set": dict.fromkeys(withheld, True),
        "hours": _hours_table(hours),
        "scopes": _scope_table(config),
        "tools": _tool_table(config),
        "operations": _operations(config),
        "visible": _visible_table(config),
    }


def _render(tables: Mapping[str, Any]) -> str:
    return json.dumps(tables, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def build_derived(policies: Path) -> str:
    """The text of the derived data file for the policies folder."""
    return _render(derived_tables(load_config(policies)))


def write_derived(policies: Path) -> Path:
    """Write the derived data file; returns its path."""
    path = policies / DERIVED_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_derived(policies), encoding="utf-8")
    return path


def check_derived(policies: Path) -> bool:
    """True when the checked-in derived data file matches the YAML."""
    path = policies / DERIVED_PATH
    return path.is_file() and path.read_text(encoding="utf-8") == build_derived(policies)


def run_build(args: Any) -> int:
    """`mcp-fhir policy build [--check]`: 0 written or fresh, 1 stale (with --check)."""
    if args.check:
        if check_derived(args.policies):
            print(f"{DERIVED_PATH} is up to date")
            return 0
        print(f"{DERIVED_PATH} is stale: run `mcp-fhir policy build` and commit the result")
        return 1
    print(f"wrote {write_derived(args.policies)}")
    return 0
