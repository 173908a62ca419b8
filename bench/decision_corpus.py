"""`python -m bench.decision_corpus`: evaluate a large, fixed corpus of decision inputs, to prove a
policy change keeps every decision byte-identical.

The corpus is built with a fixed seed from the policy's own vocabulary: every role claim (and
unknown, missing, mistyped ones), tool x resource type (and mismatches), purpose (declared, bound
by a claim, missing, unknown, contradictory), SMART scope set (v1, v2, categories, queries),
bound patient and on_behalf_of, break-glass on/off, instants on both sides of the business-hours
boundaries and Sydney's daylight-saving changes, params with categories, consent and activity
present or absent; then each field of a few valid inputs mutated into a malformed value; then
`visible_tools` inputs. Each input gets the `decision`, the `visible_tools` and the decision-log
`mask` (system.log, as it would be given that input) of the policies folder, evaluated by one
`opa eval` process per batch. The output is JSON lines sorted by input, so two runs compare with
`cmp` or with `--against`.

    python -m bench.decision_corpus --policies policies --out "${TMPDIR:-/tmp}/corpus.jsonl"
    python -m bench.decision_corpus --policies other/policies --against "${TMPDIR:-/tmp}/corpus.jsonl"
    python -m bench.decision_corpus --variant ...   # the same on a copy with changed YAML data

`--server` evaluates through one `opa run --server` (`--server-flags=--optimize-store-for-read-speed`
adds flags) instead of `opa eval`, so a server setting is checked too.
`--variant` copies the policies folder, changes its YAML data (other business hours and time
zone, labels released to roles, an extra tool and type, consent and audit-log switches, a deny
activity rule) and runs `policy build` on the copy before evaluating, so decisions that depend on
other data are compared too. `--sample N` evaluates only every N-th input (tests use it).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

OPA = Path(".tools/bin/opa")
SEED = 20
BATCH = 1500
QUERY = (
    "[[d, v, m] | some x in input.cases;"
    " d := [r | r := data.mcp_fhir.authz.decision with input as x];"
    " v := [r | r := data.mcp_fhir.authz.visible_tools with input as x];"
    ' m := [r | r := data.system.log.mask with input as {"input": x}]]'
)

ROLE_CLAIMS: list[Any] = [
    ["nurse"],
    ["clinician"],
    ["admin"],
    ["auditor"],
    ["clinician", "nurse"],
    ["nurse", "auditor"],
    ["admin", "auditor"],
    [],
    ["surgeon"],
    ["nurse", 7],
    "nurse",
    None,
]
SCOPE_SETS: list[list[Any]] = [
    ["user/Patient.rs", "user/Observation.rs"],
    ["user/*.read"],
    ["patient/*.rs"],
    ["user/*.*"],
    ["system/*.*"],
    ["*.*"],
    ["user/Observation.rs?category=laboratory", "user/Patient.r"],
    [
        "user/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs,laboratory"
    ],
    ["user/Observation.rs?code=1234", "user/Patient.read"],
    ["user/DocumentReference.cu", "user/*.rs"],
    ["patient/Observation.s", "patient/Patient.r", "patient/MedicationStatement.rs"],
    ["user/AuditEvent.rs"],
    ["patient/AuditEvent.s"],
    ["user/MedicationRequest.read", "user/MedicationStatement.rs", "user/AllergyIntolerance.rs"],
    ["user/Patient.sr", "user/Observation.x", "bogus"],
    [],
]
PATIENTS: list[Any] = ["pat-au-001", "Patient/pat-au-001", "pat-au-002", None, "<absent>"]
BOUND: list[Any] = ["<absent>", "pat-au-001", "Patient/pat-au-002", None, ""]
BOUND_PURPOSES: list[Any] = ["<absent>", "treatment", "audit", "bogus", None, ""]
PURPOSES: list[Any] = [
    "treatment",
    "medication_reconciliation",
    "discharge_summary",
    "audit",
    None,
    "",
    "  ",
    "bogus",
    "<absent>",
]
BREAK_GLASS: list[Any] = [None, {"reason": "unconscious patient"}, {"reason": ""}, {}, {"reason": None}]
TIMES = [
    "2026-03-10T02:00:00.000Z",  # Tuesday 13:00 Sydney
    "2026-03-09T20:59:59Z",  # Tuesday 07:59:59 Sydney
    "2026-03-09T21:00:00Z",  # Tuesday 08:00 Sydney
    "2026-03-09T20:59:59.999999999Z",
    "2026-03-10T06:59:30.5Z",  # Tuesday 17:59:30.5
    "2026-03-10T07:00:00Z",  # Tuesday 18:00
    "2026-03-10T18:00:00+11:00",
    "2026-03-07T02:00:00Z",  # Saturday
    "2026-03-08T13:00:00Z",  # Monday 00:00 Sydney
    "2026-04-04T15:59:59Z",  # just before Sydney DST ends (Sunday 03:00 AEDT -> 02:00 AEST)
    "2026-04-04T16:00:00Z",
    "2026-04-05T22:30:00Z",  # Monday 08:30 AEST
    "2026-10-03T15:59:59Z",  # just before Sydney DST starts (Sunday 02:00 AEST -> 03:00 AEDT)
    "2026-10-04T21:00:00Z",  # Monday 08:00 AEDT
    "2026-10-04T20:59:00-00:00",
    "2024-02-29T01:00:00Z",
    "1999-12-31T23:59:59.123+10:00",
]
PARAMS: list[Any] = [
    {},
    {"category": "laboratory"},
    {"category": "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"},
    {"category": "social-history"},
    {"category": 5, "code": "1234"},
    {"text": "free text", "date_from": "2026-01-01", "limit": 10},
    {"a/b": "x", "c~d": 1, "section": "labs"},
    "<absent>",
]
CONSENTS: list[Any] = [
    "<absent>",
    None,
    {"status": "unavailable"},
    {"status": "ok", "provisions": []},
    {"status": "ok", "provisions": [{"type": "deny"}]},
    {"status": "ok", "provisions": [{"type": "deny", "security_labels": ["HIV", "R"]}]},
    {"status": "ok", "provisions": [{"type": "permit", "security_labels": ["HIV"]}]},
    {"status": "ok", "provisions": [{"type": "deny", "purpose": ["AIPROCESS"]}]},
    {"status": "ok", "provisions": [{"type": "deny", "purpose": ["TREAT"], "classes": ["Observation"]}]},
    {"status": "ok", "provisions": [{"type": "deny", "purpose": ["HOPERAT"]}]},
    {"status": "ok", "provisions": [{"type": "deny", "actor": ["agent-1"]}]},
    {"status": "ok", "provisions": [{"type": "deny", "actor": ["Practitioner/9"]}]},
    {
        "status": "ok",
        "provisions": [{"type": "deny", "actor_roles": ["ai-agent"], "security_labels": ["MH"]}],
    },
    {"status": "ok", "provisions": [{"type": "deny", "actor_roles": ["nurse"]}]},
    {
        "status": "ok",
        "provisions": [{"type": "deny", "period": {"start": "2026-01-01T00:00:00Z", "end": None}}],
    },
    {"status": "ok", "provisions": [{"type": "deny", "period": {"start": "2027-01-01T00:00:00Z"}}]},
    {"status": "ok", "provisions": [{"type": "deny", "period": {"end": "2025-01-01T00:00:00+10:00"}}]},
    {"status": "ok", "provisions": [{"type": "deny", "period": None, "classes": ["Patient"]}]},
]
ACTIVITY: list[Any] = [
    "<absent>",
    None,
    {},
    {"60": {"calls": 3, "denials": 0, "distinct_patients": 1}},
    {"60": {"calls": 30, "denials": 10, "distinct_patients": 2}},
    {
        "600": {"calls": 90, "denials": 1, "distinct_patients": 21},
        "60": {"calls": 9, "denials": 9, "distinct_patients": 9},
    },
]
ON_BEHALF: list[Any] = ["<absent>", None, "Practitioner/9"]
AUTHN = ["oauth", "api_key", "local"]

# Malformed values per field (plus deleting the field): types, blanks, Unicode white space,
# impossible or out-of-range instants, bad consent and activity shapes.
BLANKS: list[Any] = ["", " ", "\t\n", "\u2003", "\u0085", "\u2028", "\u00a0\u3000", "\u000b", 3, None, [], {}]
NOT_OBJECTS: list[Any] = [None, "x", 3, [], [1], True]
BAD_TIMES: list[Any] = [
    "2026-02-30T25:00:00Z",
    "2026-02-29T10:00:00Z",
    "2100-02-29T10:00:00Z",
    "2000-02-29T10:00:00Z",
    "2026-03-10T02:00:00z",
    "2026-03-10 02:00:00Z",
    "2026-03-10T02:00:60Z",
    "2026-03-10T24:00:00Z",
    "2026-03-10T02:00:00+24:00",
    "2026-03-10T02:00:00.1234567890Z",
    "2026-03-10T02:00:00",
    "2026-03-10",
    "1677-12-31T23:59:59Z",
    "1678-01-01T00:00:00Z",
    "2261-12-31T23:59:59Z",
    "2262-01-01T00:00:00Z",
    "2026-04-31T00:00:00Z",
    "2026-06-31T00:00:00Z",
    "2026-13-01T00:00:00Z",
    "2026-00-10T00:00:00Z",
    "2026-03-00T00:00:00Z",
    "2026-03-10T02:00:00.Z",
    "2026-03-10T02:00:00+10:60",
    "02026-03-10T02:00:00Z",
    " 2026-03-10T02:00:00Z",
    "2026-03-10T02:00:00Z\n",
    "2026-03-10T02:00:00\u00a0Z",
    1773108000,
    None,
    "",
]
MALFORMED: dict[tuple[str, ...], list[Any]] = {
    ("subject",): NOT_OBJECTS,
    ("subject", "id"): [*BLANKS, " x", "Patient/1"],
    ("subject", "authn"): ["OAUTH", "", "jwt", None, 1],
    ("subject", "claims"): NOT_OBJECTS,
    ("subject", "scopes"): [None, "user/*.*", [1], ["a", None], {}, [["user/*.*"]]],
    ("subject", "on_behalf_of"): [1, [], {}, True, ""],
    ("action",): NOT_OBJECTS,
    ("action", "tool"): BLANKS,
    ("action", "operation"): ["zap", "READ", "", None, 1, "delete"],
    ("action", "resource_type"): [*BLANKS, '"', "\\", 'a"b'],
    ("resource",): NOT_OBJECTS,
    ("resource", "patient"): [*BLANKS, "\u2029", "\u200b"],
    ("resource", "params"): [None, "x", [], 3],
    ("context",): NOT_OBJECTS,
    ("context", "time"): BAD_TIMES,
    ("context", "purpose"): [1, [], {}, True],
    ("context", "break_glass"): ["yes", 1, [], True, {"reason": 1}, {"reason": []}],
    ("context", "backend"): [1, [], {}, True],
    ("context", "request_id"): [1, [], {}, True],
    ("context", "consent"): [
        "x",
        1,
        [],
        {},
        {"status": "maybe"},
        {"status": "ok", "provisions": {}},
        {"status": "ok", "provisions": [1]},
        {"status": "ok", "provisions": [{"type": "allow"}]},
        {"status": "ok", "provisions": [{"type": "deny", "actor": "agent-1"}]},
        {"status": "ok", "provisions": [{"type": "deny", "classes": [1]}]},
        {"status": "ok", "provisions": [{"type": "deny", "period": "2026"}]},
        {"status": "ok", "provisions": [{"type": "deny", "period": {"start": "2026-02-30T00:00:00Z"}}]},
        {"status": "ok", "provisions": [{"type": "deny", "period": {"end": 5}}]},
        {"status": "unavailable", "provisions": None},
    ],
    ("context", "activity"): [
        "x",
        1,
        [],
        {"sixty": {"calls": 1, "denials": 1, "distinct_patients": 1}},
        {"60": {"calls": 1, "denials": 1}},
        {"60": {"calls": 1, "denials": 1, "distinct_patients": 1, "x": 1}},
        {"60": {"calls": 1.5, "denials": 1, "distinct_patients": 1}},
        {"60": {"calls": -1, "denials": 1, "distinct_patients": 1}},
        {"60": {"calls": 1e3, "denials": 1, "distinct_patients": 1}},
        {"60": {"calls": "1", "denials": 1, "distinct_patients": 1}},
        {"60": []},
        {"-60": {}},
        {"": {}},
    ],
}
TOP_LEVEL: list[Any] = [None, "x", 3, [], {}, {"subject": {}}, True]


def _tools(config_tools: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every catalogued (tool, operation, type), plus mismatches and an unknown tool."""
    out = [(name, t["operation"], rt) for name, t in config_tools.items() for rt in t["resource_types"]]
    out += [
        ("read_patient", "search", "Patient"),
        ("read_patient", "read", "Observation"),
        ("search_observations", "create", "Observation"),
        ("create_clinical_note", "update", "DocumentReference"),
        ("no_such_tool", "read", "Patient"),
        ("search_audit_log", "search", "Patient"),
    ]
    return out


def _set(obj: dict[str, Any], key: str, value: Any) -> None:
    if value != "<absent>":
        obj[key] = copy.deepcopy(value)


def _decision_input(rng: random.Random, tools: list[tuple[str, str, str]]) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    _set(claims, "roles", rng.choice(ROLE_CLAIMS))
    _set(claims, "patient", rng.choice(BOUND))
    _set(claims, "purpose_of_use", rng.choice(BOUND_PURPOSES))
    if rng.random() < 0.2:
        claims.update({"iss": "https://idp", "email": "a@b.c", "nested": {"x": 1}})
    subject: dict[str, Any] = {
        "id": rng.choice(["agent-1", "svc-2"]),
        "authn": rng.choice(AUTHN),
        "claims": claims,
        "scopes": list(rng.choice(SCOPE_SETS)),
    }
    _set(subject, "on_behalf_of", rng.choice(ON_BEHALF))
    tool, operation, rtype = rng.choice(tools)
    resource: dict[str, Any] = {}
    _set(resource, "patient", rng.choice(PATIENTS))
    _set(resource, "params", rng.choice(PARAMS))
    context: dict[str, Any] = {"time": rng.choice(TIMES), "backend": "default", "request_id": "req-1"}
    _set(context, "purpose", rng.choice(PURPOSES))
    context["break_glass"] = copy.deepcopy(rng.choice(BREAK_GLASS))
    _set(context, "consent", rng.choice(CONSENTS))
    _set(context, "activity", rng.choice(ACTIVITY))
    return {
        "subject": subject,
        "action": {"tool": tool, "operation": operation, "resource_type": rtype},
        "resource": resource,
        "context": context,
    }


def _coherent_input(
    rng: random.Random, tools: list[tuple[str, str, str]], roles: dict[str, Any]
) -> dict[str, Any]:
    """A random input made mostly grantable: a role, one of its purposes, a tool on one of its types,
    broad scopes and a patient; then two fields drawn at random again (usually allowed, or one step off)."""
    case = _decision_input(rng, tools)
    role = rng.choice(sorted(roles))
    granted = set(roles[role].get("read") or []) | set(roles[role].get("write") or [])
    fitting = [t for t in tools if t[2] in granted] or tools
    tool, operation, rtype = rng.choice(fitting)
    case["action"] = {"tool": tool, "operation": operation, "resource_type": rtype}
    case["subject"]["claims"] = {"roles": [role]}
    case["subject"]["scopes"] = list(
        rng.choice([["user/*.*"], ["user/*.read"], ["patient/*.rs"], SCOPE_SETS[6]])
    )
    case["context"]["purpose"] = rng.choice(roles[role].get("purposes") or [None])
    case["context"]["break_glass"] = None
    case["context"].pop("consent", None)
    case["context"].pop("activity", None)
    case["resource"] = {"patient": "pat-au-001", "params": {}}
    other = _decision_input(rng, tools)
    for section, key in rng.sample(AXES, 2):
        if key in other[section]:
            case[section][key] = other[section][key]
        else:
            case[section].pop(key, None)
    return case


AXES = [
    ("subject", "claims"),
    ("subject", "scopes"),
    ("subject", "on_behalf_of"),
    ("resource", "patient"),
    ("resource", "params"),
    ("context", "purpose"),
    ("context", "break_glass"),
    ("context", "consent"),
    ("context", "activity"),
    ("context", "time"),
    ("action", "tool"),
]


def _mutations(base: dict[str, Any]) -> Iterator[Any]:
    for path, values in MALFORMED.items():
        for value in ["<delete>", *values]:
            case = copy.deepcopy(base)
            parent = case
            for key in path[:-1]:
                parent = parent[key]
            if value == "<delete>":
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = copy.deepcopy(value)
            yield case
    yield from copy.deepcopy(TOP_LEVEL)


def corpus(policies: Path, size: int = 12000) -> list[Any]:
    """The corpus for a policies folder (the tools come from its catalogue), fixed by SEED."""
    config_tools = yaml.safe_load((policies / "mcp_fhir/config/tools/data.yaml").read_text(encoding="utf-8"))
    tools = _tools(config_tools)
    rng = random.Random(SEED)
    roles = yaml.safe_load((policies / "mcp_fhir/config/roles/data.yaml").read_text(encoding="utf-8"))
    cases: list[Any] = [_decision_input(rng, tools) for _ in range(size // 2)]
    cases += [_coherent_input(rng, tools, roles) for _ in range(size - size // 2)]
    # Every tool x type x role x purpose once, on an otherwise valid, usually allowed input.
    for tool, operation, rtype in tools:
        for roles in ROLE_CLAIMS[:7]:
            for purpose in PURPOSES[:5]:
                case = _decision_input(rng, tools)
                case["action"] = {"tool": tool, "operation": operation, "resource_type": rtype}
                case["subject"]["claims"] = {"roles": roles}
                case["subject"]["scopes"] = ["user/*.*"]
                case["context"]["purpose"] = purpose
                case["context"]["consent"] = None
                case["context"]["break_glass"] = None
                case["context"].pop("activity", None)
                case["resource"] = {"patient": "pat-au-001", "params": {}}
                cases.append(case)
    for _ in range(8):
        cases.extend(_mutations(_decision_input(rng, tools)))
    for roles in ROLE_CLAIMS:
        for scopes in SCOPE_SETS:
            for purpose in PURPOSES:
                for bound in BOUND_PURPOSES[:3]:
                    claims: dict[str, Any] = {}
                    _set(claims, "roles", roles)
                    _set(claims, "purpose_of_use", bound)
                    context: dict[str, Any] = {"backend": "default", "time": rng.choice(TIMES)}
                    _set(context, "purpose", purpose)
                    subject = {"id": "agent-1", "authn": "oauth", "claims": claims, "scopes": scopes}
                    cases.append({"subject": subject, "context": context})
    cases.extend([{"subject": s} for s in NOT_OBJECTS])
    return cases


def _key(case: Any) -> str:
    return json.dumps(case, sort_keys=True)


IGNORES = ["--ignore", "*_test.rego", "--ignore", "fixtures"]


def _eval_batch(policies: Path, batch: list[Any], opa: Path, tmp: Path) -> list[Any]:
    """One `opa eval` process for a batch of cases."""
    batch_file = tmp / "batch.json"
    batch_file.write_text(json.dumps({"cases": batch}), encoding="utf-8")
    command = [
        str(opa),
        "eval",
        *IGNORES,
        "-d",
        str(policies),
        "--input",
        str(batch_file),
        "--format",
        "json",
        QUERY,
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return list(json.loads(out.stdout)["result"][0]["expressions"][0]["value"])


class _Server:
    """`opa run --server` on the policies folder (with extra flags, as a deployment runs it), asked
    each batch through POST /v1/query: the corpus evaluated by the server's own store."""

    def __init__(self, policies: Path, opa: Path, flags: list[str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        addr = f"127.0.0.1:{self.port}"
        command = [
            str(opa),
            "run",
            "--server",
            "--skip-version-check",
            "--addr",
            addr,
            *IGNORES,
            *flags,
            str(policies),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://{addr}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)  # the server is still compiling: poll its health endpoint
        self.close()
        raise SystemExit("opa run --server did not become healthy")

    def __call__(self, policies: Path, batch: list[Any], opa: Path, tmp: Path) -> list[Any]:
        body = json.dumps({"query": f"r := {QUERY}", "input": {"cases": batch}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/query", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            return list(json.loads(response.read())["result"][0]["r"])

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def evaluate(
    policies: Path, cases: list[Any], opa: Path = OPA, server_flags: list[str] | None = None
) -> list[str]:
    """One JSON line per case, {"input", "decision", "visible_tools", "mask"}, sorted by input.
    With server_flags (a list, possibly empty) the cases go to one `opa run --server` instead."""
    unique = {_key(c): c for c in cases}
    keys = sorted(unique)
    lines: list[str] = []
    server = _Server(policies, opa, server_flags) if server_flags is not None else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for start in range(0, len(keys), BATCH):
                chunk = keys[start : start + BATCH]
                results = (server or _eval_batch)(policies, [unique[k] for k in chunk], opa, Path(tmp))
                if len(results) != len(chunk):
                    raise SystemExit(f"opa returned {len(results)} results for {len(chunk)} inputs")
                for key, (decision, visible, mask) in zip(chunk, results, strict=True):
                    row = {
                        "input": json.loads(key),
                        "decision": decision,
                        "visible_tools": visible,
                        "mask": mask,
                    }
                    lines.append(json.dumps(row, sort_keys=True))
    finally:
        if server is not None:
            server.close()
    return lines


def make_variant(policies: Path, dest: Path) -> Path:
    """A copy of the policies folder with changed YAML data, its derived tables rebuilt."""
    from mcp_fhir.governance.build import write_derived

    shutil.copytree(policies, dest, ignore=shutil.ignore_patterns("*_test.rego", "fixtures"))
    config = dest / "mcp_fhir" / "config"

    def edit(section: str, change: Any) -> None:
        path = config / section / "data.yaml"
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        change(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    edit(
        "hours",
        lambda h: h.update(
            timezone="America/New_York", start="07:30", end="19:15", days=["Monday", "Wednesday", "Saturday"]
        ),
    )

    def roles(r: dict[str, Any]) -> None:
        r["nurse"]["sensitive_labels"] = {"treatment": ["HIV", "R", "NOTALABEL"]}
        r["nurse"]["read"].append("DiagnosticReport")
        r["clinician"]["sensitive_labels"] = {"discharge_summary": ["MH", "V"]}
        r["clinician"]["redact"] = ["Patient.telecom"]
        r["auditor"]["audit_patient_events"] = False

    edit("roles", roles)
    edit("labels", lambda lab: lab.update(break_glass_excluded=["PSYTHPN"], confidentiality=["R", "V", "N"]))
    edit(
        "tools",
        lambda t: t.update(
            search_diagnostic_reports={
                "operation": "search",
                "resource_types": ["DiagnosticReport", "Observation"],
            }
        ),
    )

    def purposes(p: dict[str, Any]) -> None:
        p["treatment"]["resource_types"]["DiagnosticReport"] = {"categories": ["LAB"]}
        p["treatment"]["max_results"] = 40
        p["medication_reconciliation"]["max_lookback_days"] = 90

    edit("purposes", purposes)
    edit("consent", lambda c: c.update(break_glass_overrides=True))
    edit("audit_log", lambda a: a.update(bound_subject_own_patient_only=False))
    edit(
        "activity",
        lambda a: a["rules"].update(
            burst_deny={"counter": "calls", "window_s": 60, "at_least": 25, "action": "deny"}
        ),
    )
    edit("defaults", lambda d: d.update(decision_valid_for_s=120, max_results=50))
    write_derived(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decision_corpus", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--policies", type=Path, default=Path("policies"))
    parser.add_argument("--out", type=Path, help="write the sorted JSON lines here")
    parser.add_argument(
        "--against", type=Path, help="compare with an earlier output; exit 1 on any difference"
    )
    parser.add_argument("--variant", action="store_true", help="evaluate a copy with changed YAML data")
    parser.add_argument("--size", type=int, default=12000, help="random decision inputs (default 12000)")
    parser.add_argument("--sample", type=int, default=1, help="evaluate only every N-th input")
    parser.add_argument("--opa", type=Path, default=OPA)
    parser.add_argument("--server", action="store_true", help="evaluate through one `opa run --server`")
    parser.add_argument(
        "--server-flags", default="", help="its extra flags, e.g. =--optimize-store-for-read-speed"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        policies = make_variant(args.policies, Path(tmp) / "policies") if args.variant else args.policies
        cases = corpus(policies, args.size)[:: args.sample]
        lines = evaluate(policies, cases, args.opa, args.server_flags.split() if args.server else None)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    allowed = sum('"allow":true' in line.replace(" ", "") for line in lines)
    print(f"{len(lines)} distinct inputs, {allowed} allowed", file=sys.stderr)
    if args.against:
        before = args.against.read_text(encoding="utf-8").rstrip("\n").split("\n")
        if before == lines:
            print(f"identical to {args.against}", file=sys.stderr)
            return 0
        diffs = [(a, b) for a, b in zip(before, lines, strict=False) if a != b]
        print(
            f"DIFFERENT from {args.against}: {len(before)} vs {len(lines)} lines, {len(diffs)} differ",
            file=sys.stderr,
        )
        for a, b in diffs[:3]:
            print(f"- {a}\n+ {b}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
