package mcp_fhir.authz.consent_test

import data.mcp_fhir.authz
import data.mcp_fhir.authz.consent
import data.mcp_fhir.authz.testing

# A provision in the normalised form of mcp_fhir/consent.py; `over` replaces fields.
_p(over) := object.union(
	{
		"consent": "c1", "type": "deny", "actor": [], "action": [], "purpose": [],
		"security_labels": [], "classes": [], "codes": [], "data": [],
		"period": {"start": null, "end": null},
	},
	over,
)

_with(provisions) := testing.patched(testing.clinician_obs, {"/context/consent": {"status": "ok", "provisions": provisions}})

_glass(i) := testing.patched(i, {"/context/break_glass": {"reason": "arrest"}})

_ai_actor := [{"role": "ai-agent", "reference": null}]

_codes(i) := {r.code | some r in d.reasons} if d := authz.decision with input as i

_excluded(i) := {l | some l in d.obligations.exclude_security_labels} if d := authz.decision with input as i

_allow(i) := d.allow if d := authz.decision with input as i

# Each case: an input, whether it is allowed, the reason codes, and labels that must be excluded.
_cases := {
	"no consent block: unchanged": [testing.clinician_obs, true, set(), set()],
	"consent read, no provisions": [_with([]), true, set(), set()],
	"AI opt-out denies": [_with([_p({"actor": _ai_actor, "action": ["access"]})]), false, {"CONSENT_DENIED"}, set()],
	"whole-record deny with no actor": [_with([_p({})]), false, {"CONSENT_DENIED"}, set()],
	"deny naming another actor role does not bind": [_with([_p({"actor": [{"role": "PRCP", "reference": "Practitioner/f204"}]})]), true, set(), set()],
	"deny naming the person the agent acts for binds": [
		testing.patched(_with([_p({"actor": [{"role": "PRCP", "reference": "Practitioner/f204"}]})]), {"/subject/on_behalf_of": "Practitioner/f204"}),
		false, {"CONSENT_DENIED"}, set(),
	],
	"PSY restriction withheld under treatment": [_with([_p({"security_labels": ["PSY", "R"]})]), true, set(), {"PSY", "R"}],
	"ended period has no effect": [_with([_p({"period": {"start": "2024-01-01", "end": "2025-05-30"}})]), true, set(), set()],
	"ended dateTime period has no effect": [_with([_p({"period": {"start": null, "end": "2025-06-02T00:00:00Z"}})]), true, set(), set()],
	"period not yet started has no effect": [_with([_p({"period": {"start": "2025-07-01", "end": null}})]), true, set(), set()],
	"period in effect denies": [_with([_p({"period": {"start": "2025-06-01", "end": "2025-06-03"}})]), false, {"CONSENT_DENIED"}, set()],
	"unparseable period keeps the provision in effect": [_with([_p({"period": {"start": "2025", "end": "soon"}})]), false, {"CONSENT_DENIED"}, set()],
	"permit never widens": [
		testing.patched(_with([_p({"type": "permit", "security_labels": ["PSY"]})]), {"/subject/claims/roles": ["nurse"], "/action/resource_type": "Condition", "/action/tool": "search_conditions"}),
		false, {"ROLE_NOT_PERMITTED"}, set(),
	],
	"permit leaves the default exclusions": [_with([_p({"type": "permit", "security_labels": ["PSY"]})]), true, set(), set()],
	"class deny binds its type": [_with([_p({"classes": ["Observation"]})]), false, {"CONSENT_DENIED"}, set()],
	"class deny leaves other types": [_with([_p({"classes": ["Condition"]})]), true, set(), set()],
	"instance deny binds the instance's type": [_with([_p({"data": ["Observation/o1"]})]), false, {"CONSENT_DENIED"}, set()],
	"instance deny leaves other types": [_with([_p({"data": ["DocumentReference/d1"]})]), true, set(), set()],
	"other action does not bind": [_with([_p({"action": ["research"]})]), true, set(), set()],
	"matching purpose binds": [_with([_p({"purpose": ["TREAT"]})]), false, {"CONSENT_DENIED"}, set()],
	"other purpose does not bind": [_with([_p({"purpose": ["HRESCH"]})]), true, set(), set()],
	"unavailable consent denies": [testing.patched(testing.clinician_obs, {"/context/consent": {"status": "unavailable", "provisions": []}}), false, {"CONSENT_UNAVAILABLE"}, set()],
	"malformed consent block denies": [testing.patched(testing.clinician_obs, {"/context/consent": {"status": "ok", "provisions": "x"}}), false, {"CONSENT_UNAVAILABLE"}, set()],
	"break-glass does not override by default": [_glass(_with([_p({"actor": _ai_actor})])), false, {"CONSENT_DENIED"}, set()],
}

test_consent_table if {
	failures := {name: got |
		some name, c in _cases
		[i, allow, codes, added] := c
		got := {"allow": _allow(i), "codes": _codes(i), "missing": added - _excluded(i)}
		got != {"allow": allow, "codes": codes, "missing": set()}
	}
	count(failures) == 0
}

_override := {"break_glass_overrides": true}

_overridden(i) := {
	"allow": d.allow,
	"alerts": {a | some a in d.audit.alerts},
	"overridden": o,
} if {
	d := authz.decision with input as i with data.mcp_fhir.config.consent.break_glass_overrides as true
	o := consent.overridden with input as i with data.mcp_fhir.config.consent.break_glass_overrides as true
}

test_break_glass_overrides_only_where_data_says_so_and_alerts if {
	got := {name: _overridden(i) |
		some name, i in {
			"opt-out": _glass(_with([_p({"actor": _ai_actor})])),
			"unavailable": _glass(testing.patched(testing.clinician_obs, {"/context/consent": {"status": "unavailable", "provisions": []}})),
			"no consent": _glass(testing.clinician_obs),
		}
	}
	got["opt-out"] == {"allow": true, "alerts": {"break_glass", "consent_overridden"}, "overridden": true}
	got.unavailable == {"allow": true, "alerts": {"break_glass", "consent_overridden"}, "overridden": true}
	got["no consent"] == {"allow": true, "alerts": {"break_glass"}, "overridden": false}
}

test_overridden_restriction_adds_no_label if {
	i := _glass(_with([_p({"security_labels": ["PSY"]})]))
	consent.excluded_labels == set() with input as i with data.mcp_fhir.config.consent.break_glass_overrides as true
}

test_consent_denied_reason_is_written_once_in_metadata if {
	reasons := [r | some r in authz.decision.reasons] with input as _with([_p({})])
	reasons == [{"code": "CONSENT_DENIED", "message": "The patient's consent directive does not permit this access"}]
}

# A role that releases PSY under treatment still has it withheld when the patient restricted it.
test_restriction_withholds_a_label_the_role_releases if {
	i := _with([_p({"security_labels": ["PSY"]})])
	released := {"treatment": ["PSY"]}
	without := _excluded(testing.clinician_obs) with data.mcp_fhir.config.roles.clinician.sensitive_labels as released
	with_consent := _excluded(i) with data.mcp_fhir.config.roles.clinician.sensitive_labels as released
	not "PSY" in without
	"PSY" in with_consent
}
