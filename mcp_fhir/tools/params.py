"""Typed, validated tool parameters. Validation rejects before anything else runs.

Ids follow the FHIR id grammar, dates are real dates, ranges are bounded, free text is
capped. Purposes are opaque tokens here: which purposes exist is the policy's business.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Any

from pydantic import Field

from mcp_fhir._exceptions import InvalidArgument

FHIR_ID = r"^[A-Za-z0-9\-\.]{1,64}$"
CATEGORY_PATTERN = r"^[A-Za-z0-9\-\._:/]{1,128}$"
CODE_PATTERN = r"^([A-Za-z0-9\-\._:/]{1,200}\|)?[A-Za-z0-9\-\._:]{1,64}$"

PatientId = Annotated[str, Field(pattern=FHIR_ID, description="Canonical patient id (FHIR id grammar).")]
ResourceId = Annotated[str, Field(pattern=FHIR_ID, description="FHIR resource id.")]
Purpose = Annotated[
    str | None,
    Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]{0,63}$",
        description="Purpose of use for this call, e.g. treatment. Your credential may bind one.",
    ),
]
BreakGlassReason = Annotated[
    str | None,
    Field(
        default=None, min_length=10, max_length=500, description="Emergency access justification (audited)."
    ),
]
Category = Annotated[
    str | None, Field(default=None, pattern=CATEGORY_PATTERN, description="FHIR category code.")
]
Code = Annotated[
    str | None,
    Field(default=None, pattern=CODE_PATTERN, description="Code as `system|code` or `code` (e.g. LOINC)."),
]
DateFrom = Annotated[date | None, Field(default=None, description="Earliest clinical date (inclusive).")]
DateTo = Annotated[date | None, Field(default=None, description="Latest clinical date (inclusive).")]
PageSize = Annotated[int | None, Field(default=None, ge=1, le=100, description="Results per page (1-100).")]
Continuation = Annotated[
    str | None,
    Field(
        default=None,
        max_length=4096,
        pattern=r"^[A-Za-z0-9_\-\.]+$",
        description="Token from a previous page.",
    ),
]


def check_range(date_from: date | None, date_to: date | None, *, max_days: int) -> None:
    """A date range must be ordered and bounded."""
    if date_from and date_to and date_from > date_to:
        raise InvalidArgument("date_from", "must not be after date_to")
    if date_from and date_to and (date_to - date_from) > timedelta(days=max_days):
        raise InvalidArgument("date_to", f"the range may span at most {max_days} days")
    today = date.today()
    if date_from and (today - date_from) > timedelta(days=max_days * 3):
        raise InvalidArgument("date_from", "is implausibly far in the past")


def audit_params(**params: Any) -> dict[str, Any]:
    """The PHI-free view of validated arguments for the decision input and the audit record."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        out[key] = value.isoformat() if isinstance(value, date) else value
    return out
