"""The policy seam: one `evaluate()` that turns a decision input into a `Decision`.

`Decision.parse` is the only place an OPA result is interpreted. Anything that does not
match the contract in `policies/README.md` is a `PolicyMalformed` (fail closed), never a
guess. `FakePolicyEngine` is the in-package fake for unit tests of other modules.

Obligations that only some tools carry (`audit_patients`, on `search_audit_log`; `confirm`,
`{prompt_code, ttl_s}`, where the policy's data asks a person to confirm a write) are
parsed when present and remembered as absent otherwise; the decide step
(`policy/decide.py`) fails closed when a tool that needs one gets an allow without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mcp_fhir._exceptions import PolicyError, PolicyMalformed, PolicyUndefined

OBLIGATION_KEYS = (
    "exclude_security_labels",
    "allowed_categories",
    "redact",
    "max_lookback_days",
    "max_results",
)
# Obligations only some tools' decisions carry; `Obligations.present` says which ones came back.
TOOL_OBLIGATION_KEYS = ("audit_patients", "confirm")


@dataclass(frozen=True, slots=True)
class Obligations:
    """What an allow obliges the sidecar to enforce. Interpreted generically, whatever the policy sets."""

    exclude_security_labels: frozenset[str] = frozenset()
    allowed_categories: Mapping[str, frozenset[str]] = field(default_factory=dict)
    redact: tuple[str, ...] = ()
    max_lookback_days: int | None = None
    max_results: int | None = None
    # `null` (None) = events about any patient; a set = only events about those patients.
    audit_patients: frozenset[str] | None = None
    # A person must confirm before the write: {"prompt_code": str, "ttl_s": number} (None: no confirmation).
    confirm: Mapping[str, Any] | None = None
    present: frozenset[str] = frozenset()  # which of TOOL_OBLIGATION_KEYS the decision carried

    def __repr__(self) -> str:
        # audit_patients holds patient ids: a repr shows only how many.
        scope = "any" if self.audit_patients is None else len(self.audit_patients)
        return f"Obligations(max_results={self.max_results!r}, audit_patients={scope})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exclude_security_labels": sorted(self.exclude_security_labels),
            "allowed_categories": {k: sorted(v) for k, v in sorted(self.allowed_categories.items())},
            "redact": list(self.redact),
            "max_lookback_days": self.max_lookback_days,
            "max_results": self.max_results,
        }
        if "audit_patients" in self.present:
            out["audit_patients"] = None if self.audit_patients is None else sorted(self.audit_patients)
        if self.confirm is not None:
            out["confirm"] = dict(self.confirm)
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    """One policy decision, as enforced."""

    allow: bool
    reasons: tuple[dict[str, str], ...] = ()
    obligations: Obligations = field(default_factory=Obligations)
    sensitivity: str | None = None
    alerts: tuple[str, ...] = ()
    decision_id: str | None = None
    revision: str | None = None
    # How long (whole seconds from the input's `context.time`) the policy says this decision stays
    # what it is: `decision.valid_for_s`. None when the policy set none (or an unusable value):
    # such a decision is never reused. Read only by the optional decision cache (`policy/decide.py`).
    valid_for_s: int | None = None
    # "hit" when the decision cache answered (the decision id is the reused one), "miss" when it
    # was on and OPA answered; None when the cache is off.
    cache: str | None = None

    @property
    def reason_codes(self) -> tuple[str, ...]:
        return tuple(r["code"] for r in self.reasons)

    @classmethod
    def denied_by(cls, exc: PolicyError) -> Decision:
        """A policy failure is a deny: OPA down, slow, undefined or malformed each deny with their own code."""
        return cls(
            allow=False, reasons=({"code": exc.code, "message": exc.message},), decision_id=exc.decision_id
        )

    @classmethod
    def parse(cls, body: Any, *, decision_id: str | None = None, revision: str | None = None) -> Decision:
        """Interpret the body of POST /v1/data/mcp_fhir/authz/decision. Raises on anything off-contract."""
        if not isinstance(body, Mapping):
            raise PolicyMalformed("OPA answered with a body that is not an object", decision_id=decision_id)
        if "result" not in body:
            raise PolicyUndefined("the decision rule is undefined for this input", decision_id=decision_id)
        result = body["result"]
        if not isinstance(result, Mapping):
            raise PolicyMalformed("the decision is not an object", decision_id=decision_id)
        allow = result.get("allow")
        if not isinstance(allow, bool):
            raise PolicyMalformed("decision.allow is not a boolean", decision_id=decision_id)
        reasons = _parse_reasons(result.get("reasons", []), decision_id)
        if not allow and not reasons:
            raise PolicyMalformed("a deny carried no reason", decision_id=decision_id)
        obligations = _parse_obligations(result.get("obligations"), required=allow, decision_id=decision_id)
        audit = result.get("audit", {})
        if not isinstance(audit, Mapping):
            raise PolicyMalformed("decision.audit is not an object", decision_id=decision_id)
        sensitivity = audit.get("sensitivity")
        alerts = audit.get("alerts", [])
        if sensitivity is not None and not isinstance(sensitivity, str):
            raise PolicyMalformed("decision.audit.sensitivity is not a string", decision_id=decision_id)
        if not isinstance(alerts, list) or not all(isinstance(a, str) for a in alerts):
            raise PolicyMalformed("decision.audit.alerts is not a list of strings", decision_id=decision_id)
        return cls(
            allow=allow,
            reasons=reasons,
            obligations=obligations,
            sensitivity=sensitivity,
            alerts=tuple(alerts),
            decision_id=decision_id,
            revision=revision,
            valid_for_s=_lifetime(result.get("valid_for_s")),
        )


def _lifetime(value: Any) -> int | None:
    """`decision.valid_for_s` as whole seconds, or None (never reuse) for anything but a positive number.

    Lenient on purpose: the field only allows reuse, so an unusable value means "do not cache",
    never a deny; the decision itself is enforced exactly as without it.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 1:
        return None
    return int(min(value, 86_400))


def _parse_reasons(raw: Any, decision_id: str | None) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list):
        raise PolicyMalformed("decision.reasons is not a list", decision_id=decision_id)
    out = []
    for r in raw:
        if not isinstance(r, Mapping) or not isinstance(r.get("code"), str) or not r["code"]:
            raise PolicyMalformed("a reason has no string code", decision_id=decision_id)
        out.append({"code": r["code"], "message": str(r.get("message", ""))})
    return tuple(sorted(out, key=lambda r: r["code"]))


def _str_list(value: Any, key: str, decision_id: str | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyMalformed(f"obligations.{key} is not a list of strings", decision_id=decision_id)
    return value


def _limit(value: Any, key: str, decision_id: str | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or value != int(value):
        raise PolicyMalformed(
            f"obligations.{key} is not a non-negative whole number", decision_id=decision_id
        )
    return int(value)


def _confirm(value: Any, decision_id: str | None) -> dict[str, Any] | None:
    """`confirm: {prompt_code, ttl_s}`; null or absent is no confirmation, anything else off-contract is malformed."""
    if value is None:
        return None
    if (
        not isinstance(value, Mapping)
        or not isinstance(value.get("prompt_code"), str)
        or not value["prompt_code"]
        or isinstance(value.get("ttl_s"), bool)
        or not isinstance(value.get("ttl_s"), int | float)
        or value["ttl_s"] <= 0
    ):
        raise PolicyMalformed(
            "obligations.confirm is not {prompt_code: string, ttl_s: positive number}",
            decision_id=decision_id,
        )
    return {"prompt_code": value["prompt_code"], "ttl_s": value["ttl_s"]}


def _parse_obligations(raw: Any, *, required: bool, decision_id: str | None) -> Obligations:
    if raw is None and not required:
        return Obligations()
    if not isinstance(raw, Mapping):
        raise PolicyMalformed("decision.obligations is not an object", decision_id=decision_id)
    missing = [k for k in OBLIGATION_KEYS if k not in raw]
    if required and missing:
        # An allow without its obligations could silently widen access: fail closed.
        raise PolicyMalformed(
            "an allow is missing obligations: " + ", ".join(missing), decision_id=decision_id
        )
    categories = raw.get("allowed_categories", {})
    if not isinstance(categories, Mapping):
        raise PolicyMalformed("obligations.allowed_categories is not an object", decision_id=decision_id)
    audit_patients = raw.get("audit_patients")
    if audit_patients is not None:
        audit_patients = frozenset(_str_list(audit_patients, "audit_patients", decision_id))
    confirm = _confirm(raw.get("confirm"), decision_id)
    return Obligations(
        exclude_security_labels=frozenset(
            _str_list(raw.get("exclude_security_labels", []), "exclude_security_labels", decision_id)
        ),
        allowed_categories={
            str(t): frozenset(_str_list(c, f"allowed_categories.{t}", decision_id))
            for t, c in categories.items()
        },
        redact=tuple(_str_list(raw.get("redact", []), "redact", decision_id)),
        max_lookback_days=_limit(raw.get("max_lookback_days"), "max_lookback_days", decision_id),
        max_results=_limit(raw.get("max_results"), "max_results", decision_id),
        audit_patients=audit_patients,
        confirm=confirm,
        present=frozenset(k for k in TOOL_OBLIGATION_KEYS if k in raw and (k != "confirm" or confirm)),
    )


class PolicyEngine(Protocol):
    """Decides one call. Every failure is raised as a `PolicyError` leaf: callers deny on any exception."""

    async def evaluate(self, decision_input: Mapping[str, Any]) -> Decision: ...

    async def visible_tools(self, subject_input: Mapping[str, Any]) -> frozenset[str]: ...

    async def policy_data(self, path: str) -> Any:
        """A document under `data.` (e.g. `mcp_fhir/config/purposes`), for publishing; never for deciding."""
        ...


class FakePolicyEngine:
    """An in-package fake for unit tests: answers with a function of the input, records every call."""

    def __init__(
        self,
        decide: Callable[[Mapping[str, Any]], Decision] | None = None,
        visible: frozenset[str] = frozenset(),
        data: Mapping[str, Any] | None = None,
    ) -> None:
        self._decide = decide or (
            lambda _i: Decision(allow=False, reasons=({"code": "FAKE_DENY", "message": ""},))
        )
        self._visible = visible
        self._data = dict(data or {})
        self.calls: list[Mapping[str, Any]] = []
        self.current_revision: str | None = None  # the active bundle revision, as OpaPolicyEngine knows it

    def answer_with(self, decide: Callable[[Mapping[str, Any]], Decision]) -> None:
        """Change the answer from now on."""
        self._decide = decide

    async def evaluate(self, decision_input: Mapping[str, Any]) -> Decision:
        self.calls.append(decision_input)
        return self._decide(decision_input)

    async def visible_tools(self, subject_input: Mapping[str, Any]) -> frozenset[str]:
        return self._visible

    async def policy_data(self, path: str) -> Any:
        return self._data.get(path)
