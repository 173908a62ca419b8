"""create_clinical_note writes the AI Transparency way, and only after a person confirms when the decision
asks (issue #21 §5, §6), over the in-package fakes; the real client and test bed are in
tests/integration/test_notes_e2e.py."""

from __future__ import annotations

from typing import Any

import pytest
from mcp.server.elicitation import AcceptedElicitation, CancelledElicitation, DeclinedElicitation

from mcp_fhir._exceptions import ConfirmationDeclined, ConfirmationRequired
from mcp_fhir.policy.engine import Obligations
from mcp_fhir.tools import CallPath
from mcp_fhir.tools.confirm import ConfirmSchema
from mcp_fhir.tools.transparency import AI_PROVENANCE_PROFILE, OBSERVATION_VALUE
from tests.tools.conftest import PATIENT, Harness, allow_with, make_harness

CONFIRM = {"prompt_code": "confirm_clinical_note", "ttl_s": 5}
NOTE_ARGS = {
    "patient_id": PATIENT,
    "title": "Progress",
    "text": "Seen today.",
    "idempotency_key": "key-12345678",
    "purpose": "treatment",
}


class Info:
    name = "ward-assistant"
    version = "2.1"
    model_extra = {"model": "example-llm-7b"}


class Session:
    def __init__(self, supports: bool) -> None:
        self.supports = supports
        self.client_params = type("Params", (), {"client_info": Info()})()

    def check_client_capability(self, capability: Any) -> bool:
        return self.supports and capability.elicitation is not None


class Ctx:
    """The SDK's request context, as far as the call path uses it."""

    def __init__(self, answer: Any = None, *, supports: bool = True) -> None:
        self.session = Session(supports)
        self.answer = answer
        self.asked = 0

    async def elicit(self, message: str, schema: type) -> Any:
        self.asked += 1
        return self.answer


def _harness(confirm: dict[str, Any] | None = None) -> Harness:
    return make_harness(lambda _i: allow_with(Obligations(confirm=confirm), decision_id="d-note"))


async def _write(h: Harness, ctx: Any = None) -> Any:
    return await CallPath(h.app).run(h.tools["create_clinical_note"], NOTE_ARGS, ctx=ctx)


def _written(h: Harness, rtype: str) -> list[dict[str, Any]]:
    return [r for r in h.ehr.resources if r["resourceType"] == rtype]


async def test_a_note_goes_in_one_transaction_labelled_aiast_with_device_and_provenance():
    h = _harness()
    await _write(h, Ctx())
    [bundle] = h.ehr.transactions
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == [
        "DocumentReference",
        "Device",
        "Provenance",
    ]
    [note] = _written(h, "DocumentReference")
    assert {"system": OBSERVATION_VALUE, "code": "AIAST"}.items() <= note["meta"]["security"][0].items()
    assert "tag" not in note["meta"]  # the private urn:mcp-fhir:provenance tag is gone
    [provenance] = _written(h, "Provenance")
    assert provenance["meta"]["profile"] == [AI_PROVENANCE_PROFILE]
    assert provenance["policy"] == ["urn:mcp-fhir:decision:d-note"]
    [device] = _written(h, "Device")
    names = {n["type"]: n["name"] for n in device["deviceName"]}
    assert names == {"model-name": "example-llm-7b", "user-friendly-name": "ward-assistant"}


async def test_a_client_that_names_no_model_gets_a_device_without_one():
    h = _harness()
    await _write(h)  # no ctx: nothing declared
    [device] = _written(h, "Device")
    assert "deviceName" not in device


async def test_an_accepted_confirmation_writes_and_is_in_the_audit_record():
    h = _harness(CONFIRM)
    ctx = Ctx(AcceptedElicitation(data=ConfirmSchema(confirm=True)))
    result = await _write(h, ctx)
    assert not result.is_error and ctx.asked == 1
    assert len(_written(h, "DocumentReference")) == 1
    [record] = h.sink.records
    assert (record.result, record.extra["confirmation"]) == (
        "allowed",
        {"outcome": "accepted", "prompt_code": "confirm_clinical_note"},
    )


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [(DeclinedElicitation(), "declined"), (CancelledElicitation(), "cancelled")],
)
async def test_a_declined_or_cancelled_confirmation_writes_nothing_and_is_audited(answer: Any, outcome: str):
    h = _harness(CONFIRM)
    with pytest.raises(ConfirmationDeclined):
        await _write(h, Ctx(answer))
    assert h.ehr.transactions == []
    [record] = h.sink.records
    assert (record.result, record.error_code, record.extra["confirmation"]["outcome"]) == (
        "error",
        "confirmation_declined",
        outcome,
    )


@pytest.mark.parametrize("ctx", [None, Ctx(supports=False)], ids=["no context", "no elicitation"])
async def test_a_client_without_elicitation_gets_confirmation_required_and_nothing_is_written(ctx: Any):
    h = _harness(CONFIRM)
    with pytest.raises(ConfirmationRequired) as err:
        await _write(h, ctx)
    assert err.value.code == "confirmation_required"
    assert h.ehr.transactions == []
    assert h.sink.records[0].extra["confirmation"]["outcome"] == "unsupported"


async def test_without_the_obligation_no_person_is_asked():
    h = _harness()
    ctx = Ctx(DeclinedElicitation())
    await _write(h, ctx)
    assert ctx.asked == 0
    assert "confirmation" not in h.sink.records[0].extra
