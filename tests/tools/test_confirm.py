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
