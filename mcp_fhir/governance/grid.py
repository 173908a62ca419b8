"""Where the diff's decision inputs come from: a generated grid, the fixture corpus, an audit trail.

* `grid_cases(configs)` — role, tool (each of its resource types), purpose, scope and break-glass, all
  combined, plus every other input the policy data names: each claim of `config.claims` (patient
  binding on/off, the bound purpose, any other claim such as `research_consent` true/false) and each
  category label a purpose names, varied against that core. Roles, purposes, tools, claims and
  categories are read from the policy data of every side given (their union), so a role, tool or claim
  that exists on one side only is still exercised on both.
* `fixture_cases(folders)` — every `input` of `policies/fixtures/*.json` (a list of
  `{"note", "input", "expect"}`), from each side, duplicates dropped.
* `replay_cases(path)` — the `decision_input` of every `access` record in an audit trail (JSON lines
  or SQLite, decrypted when a key is given). These inputs are PHI-free by construction.

The grid builds *inputs*, never decisions: role names go into claims exactly as a credential would
carry them (through the policy's own claim name and role map), and OPA decides.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.audit.crypto import RecordCipher
from mcp_fhir.audit.query import decode_entries
from mcp_fhir.governance.diff import Case

__all__ = [
    "GRID_PATIENT",
    "GRID_TIME",
    "SCOPE_VARIANTS",
    "SENSITIVITY_VARIANTS",
    "claim_variants",
    "fixture_cases",
    "grid_cases",
    "replay_cases",
    "role_claim_name",
]

GRID_PATIENT = "grid-patient-1"
GRID_OTHER_PATIENT = "grid-patient-2"
GRID_TIME = "2026-03-03T01:00:00Z"  # a Tuesday, 12:00 in Sydney: inside business hours
GRID_BREAK_GLASS_REASON = "grid: emergency access"
SCOPE_VARIANTS = ("wildcard", "exact", "none")
SENSITIVITY_VARIANTS = ("standard", "break_glass")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def role_claim_name(config: Mapping[str, Any]) -> str:
    """The claim that carries role names, as the policy's `claims` data names it."""
    claims = config.get("claims") or {}
    return str(claims.get("roles") or "roles")


def _claim_value_for(role: str, config: Mapping[str, Any]) -> str:
    role_map = (config.get("claims") or {}).get("role_map") or {}
    for value, mapped in sorted(role_map.items()):
        if mapped == role:
            return str(value)
    return role


def _union_keys(configs: Sequence[Mapping[str, Any]], section: str) -> list[str]:
    keys: set[str] = set()
    for cfg in configs:
        value = cfg.get(section) or {}
        if isinstance(value, Mapping):
            keys.update(str(k) for k in value)
    return sorted(keys)


def _tools(configs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(tool, operation, resource type) from every side's tool catalogue, union."""
    out: set[tuple[str, str, str]] = set()
    for cfg in configs:
        for name, tool in (cfg.get("tools") or {}).items():
            if isinstance(tool, Mapping):
                for rtype in tool.get("resource_types") or []:
                    out.add((str(name), str(tool.get("operation")), str(rtype)))
    return sorted(out)


def _scopes(variant: str, rtype: str, operation: str, config: Mapping[str, Any]) -> list[str]:
    letter = ((config.get("defaults") or {}).get("scope_letter") or {}).get(operation, "r")
    return {"wildcard": ["user/*.cruds"], "exact": [f"user/{rtype}.{letter}"], "none": []}[variant]


def _claim_names(configs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Every claim the policy data names (`claims.<key>: <claim name>`, string values), from both sides."""
    names: dict[str, str] = {}
    for cfg in configs:
        claims = cfg.get("claims")
        for key, value in (claims if isinstance(claims, Mapping) else {}).items():
            if isinstance(value, str) and value.strip():
                names.setdefault(str(key), value)
    return names


def _categories(configs: Sequence[Mapping[str, Any]], rtype: str) -> list[str]:
    """Every category code a purpose of either side names for `rtype`."""
    out: set[str] = set()
    for cfg in configs:
        for purpose in (cfg.get("purposes") or {}).values():
            if not isinstance(purpose, Mapping):
                continue
            entry = (purpose.get("resource_types") or {}).get(rtype)
            if isinstance(entry, Mapping):
                out.update(str(c) for c in entry.get("categories") or [])
    return sorted(out)


Variant = tuple[str, dict[str, Any], dict[str, Any]]  # (label, claims to add, params to add)


def claim_variants(configs: Sequence[Mapping[str, Any]], purposes: Sequence[str]) -> list[list[Variant]]:
    """One list of variants per claim the policy data names, besides the roles claim.

    * the patient claim (`claims.patient`): bound to the requested patient, bound to another one;
    * the purpose claim (`claims.purpose`): bound to each purpose of either side;
    * every other claim (e.g. `claims.research_consent: research_consent`): `true` and `false`.

    Absent is each dimension's baseline (the core grid). The keys `patient` and `purpose` are the
    policy data's own names for those claims; the values are facts, and OPA decides.
    """
    dims: list[list[Variant]] = []
    for key, claim in sorted(_claim_names(configs).items()):
        if key == "roles":
            continue
        if key == "patient":
            dims.append([
                (f"{claim}=bound", {claim: GRID_PATIENT}, {}),
                (f"{claim}=other", {claim: GRID_OTHER_PATIENT}, {}),
            ])  # fmt: skip
        elif key == "purpose":
            dims.append([(f"{claim}={p}", {claim: p}, {}) for p in purposes])
        else:
            dims.append([(f"{claim}=true", {claim: True}, {}), (f"{claim}=false", {claim: False}, {})])
    return dims


def grid_cases(configs: Sequence[Mapping[str, Any]], *, full: bool = False) -> list[Case]:
    """Decision inputs derived from everything the policy data names.

    The core grid is every role, tool/resource type, purpose (and none), scope variant and
    break-glass off/on, all combined. Then every other input the policy reads is varied against the core with the
    least-privilege (`exact`) scope: each claim the data names (`claim_variants`: patient binding on
    and off, the bound purpose, any other claim true/false) and each category label a purpose names for
    the resource type (`resource.params.category`). Each of those dimensions is varied on its own (the
    others at their baseline: absent); `full=True` crosses them all with each other and with every
    scope variant (many more inputs).
    """
    if not configs:
        return []
    first = configs[0]
    role_claim = role_claim_name(first)
    non_patient: set[str] = set()
    for cfg in configs:
        non_patient.update((cfg.get("defaults") or {}).get("non_patient_resource_types") or [])
    named_purposes = _union_keys(configs, "purposes")
    purposes: list[str | None] = [*named_purposes, None]
    dims = claim_variants(configs, named_purposes)
    baseline: Variant = ("", {}, {})
    cases = []
    for role in _union_keys(configs, "roles"):
        role_claims = {role_claim: [_claim_value_for(role, first)]}
        for tool, operation, rtype in _tools(configs):
            rtype_dims = [*dims]
            categories = _categories(configs, rtype)
            if categories:
                rtype_dims.append([(f"category={c}", {}, {"category": c}) for c in categories])
            if full:
                combos: list[tuple[str, list[Variant]]] = [
                    (scope, list(extra))
                    for scope in SCOPE_VARIANTS
                    for extra in itertools.product(*[[baseline, *d] for d in rtype_dims])
                ]
            else:
                combos = [(scope, [baseline]) for scope in SCOPE_VARIANTS]
                combos += [("exact", [variant]) for d in rtype_dims for variant in d]
            for purpose in purposes:
                for scope, extra in combos:
                    claims: dict[str, Any] = dict(role_claims)
                    params: dict[str, Any] = {}
                    for _, more_claims, more_params in extra:
                        claims.update(more_claims)
                        params.update(more_params)
                    tags = " ".join(label for label, _, _ in extra if label)
                    for sensitivity in SENSITIVITY_VARIANTS:
                        label = f"{role} {tool}/{rtype} purpose={purpose or '-'} scopes={scope} {sensitivity}"
                        cases.append(
                            Case(
                                "grid",
                                f"{label} {tags}" if tags else label,
                                {
                                    "subject": {
                                        "id": f"grid-{role}",
                                        "authn": "oauth",
                                        "claims": claims,
                                        "scopes": _scopes(scope, rtype, operation, first),
                                        "on_behalf_of": None,
                                    },
                                    "action": {"tool": tool, "operation": operation, "resource_type": rtype},
                                    "resource": {
                                        "patient": None if rtype in non_patient else GRID_PATIENT,
                                        "params": params,
                                    },
                                    "context": {
                                        "purpose": purpose,
                                        "time": GRID_TIME,
                                        "break_glass": {"reason": GRID_BREAK_GLASS_REASON}
                                        if sensitivity == "break_glass"
                                        else None,
                                        "backend": "default",
                                        "request_id": "grid",
                                    },
                                },
                            )
                        )
    return cases


def fixture_cases(folders: Iterable[Path]) -> list[Case]:
    """The `input` of every case in `<folder>/*.json`, each labelled with its note."""
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                items = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ConfigError("policy.fixtures", f"{path.name} is not JSON") from exc
            if not isinstance(items, list):
                raise ConfigError("policy.fixtures", f"{path.name} must be a list of cases")
            for i, item in enumerate(items):
                if isinstance(item, Mapping) and isinstance(item.get("input"), Mapping):
                    out.append(Case("fixture", str(item.get("note") or f"{path.name}[{i}]"), item["input"]))
    return out


class _Record(msgspec.Struct):
    """The two fields of a stored record that the replay reads (the rest is skipped unparsed)."""

    kind: Any = "access"
    decision_input: Any = None


class _Line(msgspec.Struct):
    seq: Any = 0
    record: _Record | None = None
    ct: Any = None


_SLIM = msgspec.json.Decoder(_Line)
_LINE = msgspec.json.Decoder()


def _file_entries(path: Path, cipher: RecordCipher | None) -> Iterator[dict[str, Any]]:
    """The entries of a JSON-lines trail that `decode_entries` can turn into records, as
    `FileSink.reader` reads them, parsed by msgspec: a plain record with only the fields the replay
    reads (several times faster than json's whole line), an encrypted one whole when there is a key
    to decrypt it; a line msgspec refuses gets the standard library's say."""
    from mcp_fhir.audit.sinks.file import iter_file_lines

    for _line_no, raw, terminated in iter_file_lines(path):
        if not terminated or not raw:
            continue
        try:
            line = _SLIM.decode(raw)
        except msgspec.DecodeError:
            line = None
        if line is not None and line.record is not None:
            if int(line.seq) > 0:
                record = {"kind": line.record.kind, "decision_input": line.record.decision_input}
                yield {"seq": line.seq, "record": record}
            continue
        if line is not None and (line.ct is None or cipher is None):
            continue  # a checkpoint, a recovery entry, or a record there is no key for: no record
        try:
            entry = _LINE.decode(raw)
        except msgspec.DecodeError:
            entry = json.loads(raw)
        if int(entry.get("seq", 0)) > 0:
            yield entry


def _entries(path: Path, cipher: RecordCipher | None) -> Iterator[dict[str, Any]]:
    if path.suffix in SQLITE_SUFFIXES:
        from mcp_fhir.audit.sinks.sqlite import iter_sqlite_entries

        return iter_sqlite_entries(path)
    return _file_entries(path, cipher)


def replay_cases(path: Path, cipher: RecordCipher | None = None) -> list[Case]:
    """The recorded `decision_input` of every decided `access` record in an audit trail."""
    if not path.exists():
        raise ConfigError("policy.replay", "no such audit trail")
    out = []
    for seq, record in decode_entries(_entries(path, cipher), cipher):
        inp = record.get("decision_input")
        if record.get("kind", "access") == "access" and isinstance(inp, Mapping):
            out.append(Case("replay", f"{path.name}#seq{seq}", inp))
    return out
