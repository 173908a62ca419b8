"""Issue #11 (2): property-based tests (hypothesis) on every parser and on obligation enforcement.

* every tool's arguments, through the in-process MCP client over the real OPA and FHIR test bed:
  always a result or a typed error, never `internal_error`, and no argument value or PHI echoed;
* the JWT verifier and the API-key store on random strings: only `AuthenticationError`;
* the STU3→R4 normaliser on random dicts: a dict, or a typed error;
* `obligations.enforce` on random resources, labels and obligations: no excluded label survives,
  no redacted element is present, `max_results` holds, the lookback holds.

The HL7 v2 parser already has its property test (tests/ehr/test_hl7v2.py); it is not repeated here.
Budgets are CI-sized: 100-200 examples, no per-example deadline.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.shared.exceptions import MCPError

from mcp_fhir import config
from mcp_fhir._exceptions import AuthenticationError, MCPFhirError
from mcp_fhir.agent_auth.api_keys import ApiKeyStore, generate_api_key
from mcp_fhir.agent_auth.errors import AgentAuthError
from mcp_fhir.agent_auth.jwt import JwtVerifier
from mcp_fhir.agent_auth.settings import AgentAuthSettings, ApiKeyEntry
from mcp_fhir.catalog import CATALOGUE
from mcp_fhir.ehr.profiles import get_profile
from mcp_fhir.policy.engine import Obligations
from mcp_fhir.policy.managed_opa import ManagedOpa
from mcp_fhir.policy.obligations import clinical_date, enforce, security_codes
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import POLICIES, sidecar_config

CALL_TIMEOUT = 30.0
START_TIMEOUT = 60.0
TYPED_CODES = {
    "invalid_argument", "unknown_patient", "policy_denied", "resource_not_found", "upstream_rate_limited",
    "upstream_rejected", "upstream_bad_response", "tool_unavailable", "unauthenticated",
}  # fmt: skip
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- every tool's argument parser, through the real client ------------------------------------------------


class LoopSidecar:
    """An in-process sidecar and its MCP client on their own event loop, callable from sync hypothesis tests."""

    def __init__(self, workdir: Path, fhir_base_url: str, opa_binary: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-sidecar", daemon=True)
        self.thread.start()
        self._stop: asyncio.Event | None = None
        self.client: Client | None = None
        self._task: asyncio.Future[None] | None = None
        self.workdir, self.fhir, self.opa_binary = workdir, fhir_base_url, opa_binary

    async def _serve(self, ready: asyncio.Event) -> None:
        async with ManagedOpa([POLICIES], binary=self.opa_binary, decision_log=self.workdir / "d.log") as opa:
            identity = {
                "id": "fuzzer",
                "claims": {"roles": ["clinician"]},
                "scopes": ["user/*.rs", "user/*.c"],
            }
            cfg = sidecar_config(self.workdir, self.fhir, opa_url=opa.url, identity=identity)
            async with Client(build_server(config.from_mapping(cfg))) as client:
                self.client, self._stop = client, asyncio.Event()
                ready.set()
                await self._stop.wait()

    def start(self) -> None:
        async def go() -> None:
            ready = asyncio.Event()
            task = asyncio.ensure_future(self._serve(ready))
            self._task = task
            await asyncio.wait(
                [task, asyncio.ensure_future(ready.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            if task.done():
                task.result()

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(START_TIMEOUT)

    def call(self, tool: str, args: dict[str, Any]) -> Any:
        async def one() -> Any:
            try:
                return await self.client.call_tool(tool, args)  # type: ignore[union-attr]
            except MCPError as exc:
                return exc

        return asyncio.run_coroutine_threadsafe(one(), self.loop).result(CALL_TIMEOUT)

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(self._task, START_TIMEOUT), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(START_TIMEOUT)


@pytest.fixture(scope="module")
def fuzz_sidecar(
    tmp_path_factory: pytest.TempPathFactory, fhir_server: Any, opa_binary: str
) -> Iterator[LoopSidecar]:
    sc = LoopSidecar(tmp_path_factory.mktemp("fuzz"), fhir_server.base_url, opa_binary)
    sc.start()
    try:
        yield sc
    finally:
        sc.stop()


PARAM_NAMES = [
    "patient_id", "purpose", "category", "code", "date_from", "date_to", "page_size", "continuation",
    "break_glass_reason", "document_id", "title", "text", "idempotency_key", "resource_type", "since", "until",
    "result", "subject_id", "patient", "_include", "__proto__", "",
]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=80)
    | st.sampled_from([data.AU_PATIENT_ID, "treatment", "2026-01-01", "laboratory", "../../etc", "Patient/x"])
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)  # fmt: skip
arguments = st.dictionaries(st.sampled_from(PARAM_NAMES) | st.text(max_size=10), json_values, max_size=6)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():  # argument names are named in errors by design; values never are
            yield from _strings(v)


@pytest.mark.integration
@FUZZ
@given(tool=st.sampled_from(sorted(CATALOGUE)), args=arguments)
def test_any_json_arguments_give_a_result_or_a_typed_error_and_echo_nothing(
    fuzz_sidecar: LoopSidecar, tool: str, args: dict[str, Any]
) -> None:
    result = fuzz_sidecar.call(tool, args)
    if isinstance(result, MCPError):
        err = dict(result.error.data or {})
        text = result.error.message + json.dumps(err)
        assert err.get("code") in TYPED_CODES | {"upstream_unavailable"}, err
    elif result.is_error:
        text = result.content[0].text
        err = json.loads(text)
        assert err["code"] in TYPED_CODES, err
    else:
        return
    assert err["code"] != "internal_error"
    for value in _strings(args):
        if len(value) >= 12 and value not in {"treatment", "laboratory"}:
            assert value not in text, "an argument value was echoed in an error"
    assert not any(phi in text for phi in data.KNOWN_PHI)


# ---- JWT and API-key parsers on random strings -----------------------------------------------------------


class NoKeys:
    async def get_key(self, kid: str) -> Any:
        raise AgentAuthError("unknown_kid")


VERIFIER = JwtVerifier(
    AgentAuthSettings(issuer="https://issuer.example", audience="https://mcp.example/mcp"), NoKeys()
)
_KEY, _HASH = generate_api_key()
KEYS = ApiKeyStore([ApiKeyEntry(id="k", hash=_HASH)])
b64 = st.binary(max_size=60).map(lambda b: __import__("base64").urlsafe_b64encode(b).decode().rstrip("="))
json_b64 = json_values.map(
    lambda v: __import__("base64").urlsafe_b64encode(json.dumps(v).encode()).decode().rstrip("=")
)
tokens = st.text(max_size=300) | st.builds(lambda *p: ".".join(p), json_b64 | b64, json_b64 | b64, b64) | st.builds(
    lambda h: f"{h}.e30.sig", st.sampled_from(["eyJhbGciOiJub25lIn0", "eyJhbGciOiJIUzI1NiIsImtpZCI6IngifQ",
                                               "eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ"]))  # fmt: skip


@FUZZ
@given(token=tokens)
def test_the_jwt_verifier_raises_only_authentication_errors_on_any_string(token: str) -> None:
    with pytest.raises(AuthenticationError):
        asyncio.run(VERIFIER.verify(token))


@FUZZ
@given(key=st.text(max_size=300) | st.text(max_size=60).map(lambda s: "mfk_" + s) | st.just(_KEY[:-1] + "x"))
def test_the_api_key_store_raises_only_authentication_errors_on_any_string(key: str) -> None:
    with pytest.raises(AuthenticationError):
        KEYS.verify(key)


# ---- the STU3 normaliser on random dicts ---------------------------------------------------------------

STU3_TYPES = ["Observation", "MedicationStatement", "MedicationRequest", "Condition", "AllergyIntolerance",
              "Patient", "Encounter", "Procedure", "DocumentReference", "Bundle", "Unknown"]  # fmt: skip
fhir_like = st.dictionaries(
    st.sampled_from(["id", "status", "subject", "patient", "code", "context", "assertedDate", "effectiveDateTime",
                     "medicationCodeableConcept", "verificationStatus", "clinicalStatus", "category", "meta",
                     "dosage", "taken", "reasonNotTaken", "onsetDateTime", "type", "content"]) | st.text(max_size=6),
    json_values, max_size=8,
).flatmap(lambda d: st.sampled_from(STU3_TYPES).map(lambda t: {"resourceType": t, **d}))  # fmt: skip


@FUZZ
@given(resource=fhir_like | json_values)
def test_the_stu3_normaliser_gives_a_dict_or_a_typed_error(resource: Any) -> None:
    try:
        out = get_profile("stu3").normalise(resource)
    except MCPFhirError:
        return
    assert isinstance(out.resource, dict)


# ---- obligation enforcement -------------------------------------------------------------------------------

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
LABELS = ["PSY", "HIV", "ETH", "R", "V", "SDV", "HTEST", "N"]
CATS = ["laboratory", "vital-signs", "social-history", "exam"]
TYPES = ["Observation", "Condition", "MedicationStatement", "Patient", "Encounter"]
REDACTABLE = ["Patient.address", "Patient.telecom", "Observation.note", "*.text", "Condition.note.text"]


@st.composite
def resources(draw: st.DrawFn) -> dict[str, Any]:
    rtype = draw(st.sampled_from(TYPES))
    r: dict[str, Any] = {"resourceType": rtype, "id": draw(st.text(min_size=1, max_size=6))}
    labels = draw(st.lists(st.sampled_from(LABELS), max_size=3))
    if labels or draw(st.booleans()):
        sys = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
        r["meta"] = {"security": [{"system": sys, "code": c} for c in labels]}
    cats = draw(st.lists(st.sampled_from(CATS), max_size=2))
    if cats:
        concept = [{"coding": [{"code": c}]} for c in cats]
        r["category"] = concept if draw(st.booleans()) else concept[0]
    days = draw(st.none() | st.integers(min_value=-10, max_value=4000))
    if days is not None:
        stamp = (NOW - timedelta(days=days)).isoformat()
        key = {"Observation": "effectiveDateTime", "Condition": "recordedDate",
               "MedicationStatement": "effectiveDateTime", "Encounter": "period"}.get(rtype)  # fmt: skip
        if key == "period":
            r["period"] = {"start": stamp}
        elif key:
            r[key] = stamp
    for element in ("address", "telecom", "note", "text"):
        if draw(st.booleans()):
            r[element] = draw(st.sampled_from([[{"text": "x"}], {"text": "y"}, "z", [{"line": ["1"]}]]))
    return r


obligations = st.builds(
    Obligations,
    exclude_security_labels=st.frozensets(st.sampled_from([*LABELS, "http://terminology.hl7.org/CodeSystem/v3-ActCode|HIV"])),
    allowed_categories=st.dictionaries(st.sampled_from(TYPES), st.frozensets(st.sampled_from(CATS)), max_size=2),
    redact=st.lists(st.sampled_from(REDACTABLE), max_size=3, unique=True).map(tuple),
    max_lookback_days=st.none() | st.integers(min_value=0, max_value=3000),
    max_results=st.none() | st.integers(min_value=0, max_value=5),
)  # fmt: skip


def _present(resource: dict[str, Any], path: str) -> bool:
    head, _, rest = path.partition(".")
    if head not in (resource.get("resourceType"), "*"):
        return False
    node: Any = [resource]
    for part in rest.split("."):
        nxt = []
        for n in node if isinstance(node, list) else [node]:
            if isinstance(n, list):
                nxt += [x.get(part) for x in n if isinstance(x, dict) and part in x]
            elif isinstance(n, dict) and part in n:
                nxt.append(n[part])
        node = [x for x in nxt if x is not None]
        if not node:
            return False
    return True


@settings(max_examples=200, deadline=None)
@given(rs=st.lists(resources(), max_size=8), ob=obligations)
def test_enforcement_never_lets_an_excluded_label_a_redacted_element_or_an_old_resource_through(
    rs: list[dict[str, Any]], ob: Obligations
) -> None:
    before = json.dumps(rs, sort_keys=True)
    out = enforce(rs, ob, now=NOW)
    assert json.dumps(rs, sort_keys=True) == before  # inputs (maybe cached) are untouched
    if ob.max_results is not None:
        assert len(out.resources) <= ob.max_results
    assert len(out.resources) + out.filtered == len(rs)
    cutoff = NOW - timedelta(days=ob.max_lookback_days) if ob.max_lookback_days is not None else None
    for r in out.resources:
        assert not security_codes(r) & ob.exclude_security_labels
        allowed = ob.allowed_categories.get(r["resourceType"])
        if allowed is not None:
            codes = {c["code"] for cat in (r["category"] if isinstance(r.get("category"), list) else
                     [r.get("category") or {}]) for c in cat.get("coding", [])}  # fmt: skip
            assert codes & allowed
        if cutoff is not None and r["resourceType"] != "Patient":
            when = clinical_date(r)
            assert when is not None and when >= cutoff
        for path in ob.redact:
            assert not _present(r, path), path
