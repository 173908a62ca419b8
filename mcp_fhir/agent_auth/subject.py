"""Who is calling: the authenticated agent, as the policy sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

AuthnMethod = Literal["oauth", "api_key", "local"]


@dataclass(frozen=True, slots=True)
class Subject:
    """An authenticated caller. Python never derives a role from it: raw claims go to OPA."""

    id: str
    authn: AuthnMethod
    claims: dict[str, Any] = field(default_factory=dict)
    scopes: tuple[str, ...] = ()
    on_behalf_of: str | None = None

    def to_input(self) -> dict[str, Any]:
        """The `subject` block of the decision input."""
        return {
            "id": self.id,
            "authn": self.authn,
            "claims": self.claims,
            "scopes": list(self.scopes),
            "on_behalf_of": self.on_behalf_of,
        }

    def __repr__(self) -> str:  # claims may hold PHI-adjacent values; keep reprs thin
        return f"Subject(id={self.id!r}, authn={self.authn!r}, scopes={len(self.scopes)})"
