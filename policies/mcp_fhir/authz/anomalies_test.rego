package mcp_fhir.authz.anomalies_test

import data.mcp_fhir.authz.anomalies
import data.mcp_fhir.authz.testing

_hours := data.mcp_fhir.config.hours

_at(t) := time.parse_rfc3339_ns(t)

test_minutes_parses_clock_times if {
	anomalies.minutes("08:00") == 480
	anomalies.minutes("18:30") == 1110
}

test_business_hours_table if {
	cases := {
		"2025-06-02T22:00:00Z": true, # Tuesday 08:00 Sydney
		"2025-06-03T07:59:59Z": true, # Tuesday 17:59 Sydney
		"2025-06-03T08:00:00Z": false, # Tuesday 18:00 Sydney
		"2025-06-02T21:59:00Z": false, # Tuesday 07:59 Sydney
		"2025-06-07T01:00:00Z": false, # Saturday 11:00 Sydney
		"2025-12-02T01:00:00Z": true, # Tuesday 12:00 Sydney (daylight saving)
	}
	failures := {t | some t, want in cases; _in_hours(t) != want}
	count(failures) == 0
}

_in_hours(t) if anomalies.business_hours(_at(t), _hours)

else := false

test_after_hours_alert_raised if {
	i := testing.patched(testing.clinician_obs, {"/context/time": "2025-06-07T01:00:00Z"})
	anomalies.alerts == {"after_hours"} with input as i
}

test_business_hours_no_alert if {
	anomalies.alerts == set() with input as testing.clinician_obs
}

test_break_glass_always_alerts if {
	i := testing.patched(testing.clinician_obs, {"/context/break_glass": {"reason": "arrest"}})
	anomalies.alerts == {"break_glass"} with input as i
}

_act(w60, w600) := testing.patched(testing.clinician_obs, {"/context/activity": {"60": w60, "600": w600}})

_counts(calls, patients, denials) := {"calls": calls, "distinct_patients": patients, "denials": denials}

# Each case: activity counts -> the activity alerts raised (the decision stays allowed: action alert).
test_activity_alert_table if {
	cases := {
		"quiet": [_act(_counts(1, 1, 0), _counts(1, 1, 0)), set()],
		"20 patients in 10 min": [_act(_counts(5, 5, 0), _counts(20, 20, 0)), set()],
		"21 patients in 10 min": [_act(_counts(5, 5, 0), _counts(21, 21, 0)), {"bulk_access"}],
		"9 denials in a minute": [_act(_counts(9, 1, 9), _counts(9, 1, 9)), set()],
		"10 denials in a minute": [_act(_counts(10, 1, 10), _counts(10, 1, 10)), {"denial_burst"}],
		"both": [_act(_counts(30, 21, 10), _counts(30, 25, 10)), {"bulk_access", "denial_burst"}],
		"no activity block": [testing.clinician_obs, set()],
	}
	failures := {name: got |
		some name, c in cases
		[i, want] := c
		got := anomalies.activity_hits with input as i
		got != want
	}
	count(failures) == 0
}

test_activity_alerts_reach_the_decision_and_allow_stays if {
	d := data.mcp_fhir.authz.decision with input as _act(_counts(30, 21, 0), _counts(30, 25, 0))
	d.allow
	"bulk_access" in d.audit.alerts
}

test_activity_rule_with_action_deny_denies if {
	d := data.mcp_fhir.authz.decision with input as _act(_counts(30, 21, 0), _counts(30, 25, 0))
		with data.mcp_fhir.config.activity.rules.bulk_access.action as "deny"
	not d.allow
	{r.code | some r in d.reasons} == {"ACTIVITY_DENIED"}
	"bulk_access" in d.audit.alerts
}

test_unavailable_activity_denies_by_default_and_alerts_either_way if {
	i := testing.patched(testing.clinician_obs, {"/context/activity": {"status": "unavailable"}})
	d := data.mcp_fhir.authz.decision with input as i
	not d.allow
	{r.code | some r in d.reasons} == {"ACTIVITY_UNAVAILABLE"}
	"activity_unavailable" in d.audit.alerts
	a := data.mcp_fhir.authz.decision with input as i with data.mcp_fhir.config.activity.on_unavailable as "alert"
	a.allow
	"activity_unavailable" in a.audit.alerts
}
