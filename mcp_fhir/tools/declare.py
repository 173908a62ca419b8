"""What a tool is: a declaration. It names itself, types its parameters, says what it reads and how
to fetch, enforce and render it. It holds no call-path logic: `CallPath.run` (callpath.py) runs
every step, in order, for every tool.

    Tool(name, description, args=<ToolArgs model>, result=<result model>,
         resource_type / operation,            what the policy decides on
         fetch(call, args) -> Fetched,         step 6
         enforce(call, fetched) -> Enforced,   step 7 (default: patient binding + obligations)
         build(call, args, fetched, enforced) -> result model,
         render(result) -> markdown)           step 9: one render function per output shape

A tool's parameters are a pydantic model (`ToolArgs`): its fields are the published input
schema, and everything but the patient, the purpose and the break-glass reason is a narrowing
argument that goes into the decision input (`narrowing()`), as the policy needs it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict

from mcp_fhir.catalog import Operation
from mcp_fhir.ehr.client import FetchResult
from mcp_fhir.tools.params import audit_params
from mcp_fhir.tools.results import Withheld

if TYPE_CHECKING:
    from mcp_fhir.agent_auth.subject import Subject
    from mcp_fhir.context import AppContext
    from mcp_fhir.tools.callpath import Call

READ_ONLY = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
# The arguments that are not narrowing filters: who the call is about, and why.
CALL_FIELDS = frozenset({"patient_id", "purpose", "break_glass_reason"})


class ToolArgs(BaseModel):
    """A tool's typed parameters. Unknown arguments are refused; reprs never show values (they may be PHI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Whether `patient_id` binds the call to a patient whose data is read from the EHR (and so is
    # canonicalised through the ID map), or only names a patient in local data (the audit log).
    reads_patient_data: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fields={sorted(self.model_fields_set)})"

    __str__ = __repr__

    @property
    def patient(self) -> str | None:
        return getattr(self, "patient_id", None)

    @property
    def purpose_of_use(self) -> str | None:
        return getattr(self, "purpose", None)

    @property
    def break_glass(self) -> str | None:
        return getattr(self, "break_glass_reason", None)

    def narrowing(self) -> dict[str, Any]:
        """The PHI-free narrowing arguments, for the decision input and the audit record."""
        return audit_params(**{k: getattr(self, k) for k in type(self).model_fields if k not in CALL_FIELDS})


@dataclass
class Fetched:
    """What the fetch step brought back. `parts` holds one `Fetched` per section of a multi-part tool."""

    resources: list[dict[str, Any]] = field(default_factory=list)
    source: FetchResult | None = None
    cursor: str | None = None
    audit_extra: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, Fetched] = field(default_factory=dict)
    write: bool = False  # a write has no cache state to record

    @property
    def cache(self) -> str | None:
        return self.source.cache if self.source is not None and not self.write else None

    @property
    def upstream(self) -> FetchResult:
        """The upstream result; a fetch from the EHR always sets it (its absence is a bug, not a deny)."""
        if self.source is None:
            raise TypeError("this fetch returned no upstream result")
        return self.source


@dataclass
class Enforced:
    """What survived enforcement and how much was withheld (counts only). `parts` mirrors `Fetched.parts`."""

    resources: list[dict[str, Any]]
    withheld: Withheld = field(default_factory=Withheld)
    parts: dict[str, Enforced] = field(default_factory=dict)


Check = Callable[[Any, "AppContext", "Subject"], None]
Fetch = Callable[["Call", Any], Awaitable[Fetched]]
Enforce = Callable[["Call", Fetched], Enforced]
Build = Callable[["Call", Any, Fetched, Enforced], BaseModel]
Render = Callable[[Any], str]


@dataclass(frozen=True)
class Tool:
    """One tool, declared. See the module docstring."""

    name: str
    description: str
    args: type[ToolArgs]
    result: type[BaseModel]
    operation: Operation
    resource_type: str | Callable[[Any], str]
    fetch: Fetch
    build: Build
    render: Render
    enforce: Enforce | None = None  # None: `CallPath`'s default (patient binding, then obligations)
    check: Check | None = None  # validation that needs the limits or the caller (step 2)
    sections: tuple[str, ...] = ()  # a multi-part tool: one decision per resource type
    requires: tuple[str, ...] = ()  # obligations an allow of this tool must carry
    annotations: ToolAnnotations = field(default_factory=lambda: READ_ONLY)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def resource_types(self, args: ToolArgs) -> tuple[str, ...]:
        """What the policy decides on: one resource type, or one per section."""
        if self.sections:
            return self.sections
        rtype = self.resource_type
        return (rtype if isinstance(rtype, str) else rtype(args),)
