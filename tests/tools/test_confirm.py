"""Issue #21 (6): a write the policy marks for confirmation goes ahead only on a person's explicit accept."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mcp.server.elicitation import AcceptedElicitation, CancelledElicitation, DeclinedElicitation

from mcp_fhir._exceptions import ConfirmationDeclined, ConfirmationRequired
from mcp_fhir.tools.confirm import ConfirmSchema, confirm

OBLIGATION = {"prompt_code": "confirm_clinical_note", "ttl_s": 5}


class Session:
    def __init__(self, supports: bool) -> None:
        self.supports = supports

    def check_client_capability(self, capability: Any) -> bool:
        return self.supports and capability.elicitation is not None


class Ctx:
    def __init__(self, answer: Any = None, *, supports: bool = True, hang: bool = False) -> None:
        self.session = Session(supports)
        self.answer = answer
        self.hang = hang
        self.asked: list[str] = []

    async def elicit(self, message: str, schema: type) -> Any:
        self.asked.append(message)
        if self.hang:
            await asyncio.Event().wait()
        return self.answer


async def test_an_explicit_accept_lets_the_write_go_ahead_and_is_recorded():
    ctx = Ctx(AcceptedElicitation(data=ConfirmSchema(confirm=True)))
    outcome = await confirm(ctx, OBLIGATION, tool="create_clinical_note", patient="pat-1")
    assert outcome.to_dict() == {"outcome": "accepted", "prompt_code": "confirm_clinical_note"}
    assert "create_clinical_note" in ctx.asked[0]


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (AcceptedElicitation(data=ConfirmSchema(confirm=False)), "declined"),
        (DeclinedElicitation(), "declined"),
        (CancelledElicitation(), "cancelled"),
    ],
)
async def test_anything_but_an_explicit_accept_stops_the_write(answer: Any, outcome: str):
    with pytest.raises(ConfirmationDeclined) as exc:
        await confirm(Ctx(answer), OBLIGATION, tool="create_clinical_note", patient="pat-1")
    assert exc.value.code == "confirmation_declined"
    assert exc.value.details["confirmation"]["outcome"] == outcome


async def test_a_client_without_elicitation_gets_confirmation_required_and_is_never_asked():
    ctx = Ctx(supports=False)
    with pytest.raises(ConfirmationRequired) as exc:
        await confirm(ctx, OBLIGATION, tool="create_clinical_note", patient="pat-1")
    assert exc.value.code == "confirmation_required"
    assert exc.value.details["confirmation"]["outcome"] == "unsupported"
    assert ctx.asked == []


async def test_a_question_left_unanswered_expires_after_the_policys_ttl():
    with pytest.raises(ConfirmationRequired) as exc:
        await confirm(Ctx(hang=True), {"prompt_code": "p", "ttl_s": 0.05}, tool="t", patient=None)
    assert exc.value.details["confirmation"]["outcome"] == "expired"


class ModernCtx(Ctx):
    """A 2026-07-28 request: the answer, if any, rides the retry's input_responses."""

    protocol_version = "2026-07-28"

    def __init__(self, responses: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.input_responses = responses


async def test_on_the_2026_protocol_the_question_is_returned_as_input_required():
    from mcp_fhir.tools.confirm import INPUT_KEY, InputNeeded

    with pytest.raises(InputNeeded) as needed:
        await confirm(ModernCtx(), OBLIGATION, tool="create_clinical_note", patient="pat-1")
    request = needed.value.result.input_requests[INPUT_KEY]
    assert "create_clinical_note" in request.params.message
    assert needed.value.confirmation.to_dict()["outcome"] == "requested"


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ({"action": "accept", "content": {"confirm": True}}, "accepted"),
        ({"action": "accept", "content": {"confirm": False}}, "declined"),
        ({"action": "decline"}, "declined"),
        ({"action": "cancel"}, "cancelled"),
    ],
)
async def test_on_the_2026_protocol_the_retrys_answer_decides(answer: dict[str, Any], outcome: str):
    from mcp_fhir.tools.confirm import INPUT_KEY

    ctx = ModernCtx({INPUT_KEY: answer})
    if outcome == "accepted":
        got = await confirm(ctx, OBLIGATION, tool="create_clinical_note", patient="pat-1")
        assert got.outcome == "accepted"
        return
    with pytest.raises(ConfirmationDeclined) as err:
        await confirm(ctx, OBLIGATION, tool="create_clinical_note", patient="pat-1")
    assert err.value.details["confirmation"]["outcome"] == outcome
