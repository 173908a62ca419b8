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
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from mcp import types
from pydantic import BaseModel, Field

from mcp_fhir._exceptions import ConfirmationDeclined, ConfirmationRequired

__all__ = ["ConfirmSchema", "Confirmation", "confirm"]

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
    try:
        answer = await asyncio.wait_for(ctx.elicit(message, ConfirmSchema), timeout=ttl)
    except TimeoutError:
        raise ConfirmationRequired(
            "the confirmation was not given in time", confirmation=Confirmation("expired", code).to_dict()
        ) from None
    if answer.action == "accept" and getattr(answer.data, "confirm", False) is True:
        return Confirmation("accepted", code)
    outcome = "cancelled" if answer.action == "cancel" else "declined"
    raise ConfirmationDeclined(
        f"the person asked to confirm this write {outcome} it",
        confirmation=Confirmation(outcome, code).to_dict(),
    )
