"""A person confirms what the policy says needs confirming, the MCP way: elicitation.

When an allow carries the obligation `confirm: {prompt_code, ttl_s}`, the call path asks the human
through MCP elicitation (`elicitation/create`) before the write, and writes only on an explicit accept.

    outcome      when                                          what happens
    accepted     the person accepted and ticked `confirm`      the write goes ahead
    declined     the person declined, or accepted unticked     ConfirmationDeclined, nothing written
    cancelled    the person dismissed the question             ConfirmationDeclined, nothing written
    expired      no answer within `ttl_s`                      ConfirmationRequired, nothing written
    unsupported  the client did not declare elicitation        ConfirmationRequired, nothing written

Every outcome goes into the call's audit record (`confirmation`). The question names the tool, the
patient and the prompt code the policy chose; it carries no clinical text.

How the question travels follows the negotiated protocol, as the SDK's own resolvers do: up to
2025-11-25 a server-to-client `elicitation/create` mid-call (bounded by `ttl_s`); from 2026-07-28 an
`InputRequiredResult` (raised here as `InputNeeded`: the call path audits the request as outcome
`requested` and returns it, nothing written), and the client's retry carries the answer in
`input_responses` under `mcp-fhir.confirm`. That retry is a new call, decided afresh; `ttl_s` cannot be
held across rounds without state the client could alter, so it bounds the legacy path only. Either way
the client relays the person's answer: elicitation trusts the client to ask its human.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from mcp import types
from mcp.server.elicitation import render_elicitation_schema
from mcp.shared.exceptions import NoBackChannelError
from mcp.types import ElicitRequest, ElicitRequestFormParams, ElicitResult, InputRequiredResult
from mcp_types.version import is_version_at_least
from pydantic import BaseModel, Field, ValidationError

from mcp_fhir._exceptions import ConfirmationDeclined, ConfirmationRequired

__all__ = ["INPUT_KEY", "ConfirmSchema", "Confirmation", "InputNeeded", "confirm"]

INPUT_KEY = "mcp-fhir.confirm"  # the question's key in input_requests / input_responses
INPUT_REQUIRED_VERSION = "2026-07-28"

DEFAULT_TTL_SECONDS = 120.0
MAX_TTL_SECONDS = 900.0


class ConfirmSchema(BaseModel):
    """What the person is asked: one yes/no."""

    confirm: bool = Field(description="Tick to let the AI agent make this change to the record.")


@dataclass(frozen=True, slots=True)
class Confirmation:
    """The outcome, for the audit record."""

    outcome: str
    prompt_code: str

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "prompt_code": self.prompt_code}


class InputNeeded(Exception):
    """The person must be asked first: the call returns `result` (an `InputRequiredResult`)."""

    def __init__(self, result: InputRequiredResult, confirmation: Confirmation) -> None:
        super().__init__("input required")
        self.result = result
        self.confirmation = confirmation


def _input_required(ctx: Any) -> bool:
    version = getattr(ctx, "protocol_version", None)
    return isinstance(version, str) and is_version_at_least(version, INPUT_REQUIRED_VERSION)


def _answer(raw: Any) -> ElicitResult | None:
    if raw is None:
        return None
    try:
        return raw if isinstance(raw, ElicitResult) else ElicitResult.model_validate(raw)
    except ValidationError:
        return None  # not an answer to this question: asked again


def _supports_elicitation(ctx: Any) -> bool:
    try:
        return bool(
            ctx.session.check_client_capability(
                types.ClientCapabilities(elicitation=types.ElicitationCapability())
            )
        )
    except Exception:  # no session to ask: no way to reach a person
        return False


async def confirm(ctx: Any, obligation: dict[str, Any], *, tool: str, patient: str | None) -> Confirmation:
    """Ask the person, as the obligation says. Returns on an explicit accept; raises otherwise.

    The raised error carries the `Confirmation` as `exc.details["confirmation"]` for the audit record.
    """
    code = str(obligation.get("prompt_code") or "confirm_write")
    ttl = min(float(obligation.get("ttl_s") or DEFAULT_TTL_SECONDS), MAX_TTL_SECONDS)
    if not _supports_elicitation(ctx):
        raise ConfirmationRequired(
            "this write needs a person's confirmation, and the client cannot ask one (no elicitation)",
            confirmation=Confirmation("unsupported", code).to_dict(),
        )
    message = (
        f"An AI agent asks to run {tool}"
        + (f" for patient {patient}" if patient else "")
        + f". The policy requires your confirmation ({code})."
    )
    if _input_required(ctx):
        given = _answer((ctx.input_responses or {}).get(INPUT_KEY))
        if given is None:
            question = ElicitRequest(
                params=ElicitRequestFormParams(
                    message=message, requested_schema=render_elicitation_schema(ConfirmSchema)
                )
            )
            raise InputNeeded(
                InputRequiredResult(input_requests={INPUT_KEY: question}), Confirmation("requested", code)
            )
        action, ticked = given.action, (given.content or {}).get("confirm") is True
    else:
        try:
            answer = await asyncio.wait_for(ctx.elicit(message, ConfirmSchema), timeout=ttl)
        except TimeoutError:
            raise ConfirmationRequired(
                "the confirmation was not given in time", confirmation=Confirmation("expired", code).to_dict()
            ) from None
        except NoBackChannelError:
            raise ConfirmationRequired(
                "this write needs a person's confirmation, and the client cannot be asked on this connection",
                confirmation=Confirmation("unsupported", code).to_dict(),
            ) from None
        action = answer.action
        ticked = action == "accept" and getattr(answer.data, "confirm", False) is True
    if action == "accept" and ticked:
        return Confirmation("accepted", code)
    outcome = "cancelled" if action == "cancel" else "declined"
    raise ConfirmationDeclined(
        f"the person asked to confirm this write {outcome} it",
        confirmation=Confirmation(outcome, code).to_dict(),
    )
