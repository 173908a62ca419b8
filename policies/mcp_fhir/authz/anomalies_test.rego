package mcp_fhir.authz.anomalies_test

import data.mcp_fhir.authz
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

# Access-pattern thresholds (config/activity) on context.activity: window seconds -> counters.
_with_activity(activity) := testing.patched(testing.clinician_obs, {"/context/activity": activity})

_counters(patients, calls, denials) := {"distinct_patients": patients, "calls": calls, "denials": denials}

_activity_cases := {
	"no activity: no alert": {"activity": null, "alerts": [], "allow": true},
	"20 distinct patients in 10 min: quiet": {"activity": {"600": _counters(20, 40, 0)}, "alerts": [], "allow": true},
	"21 distinct patients in 10 min: bulk_access": {"activity": {"600": _counters(21, 40, 0)}, "alerts": ["bulk_access"], "allow": true},
	"9 denials in a minute: quiet": {"activity": {"60": _counters(1, 12, 9)}, "alerts": [], "allow": true},
	"10 denials in a minute: denial_burst": {"activity": {"60": _counters(1, 12, 10)}, "alerts": ["denial_burst"], "allow": true},
	"both windows trip": {"activity": {"60": _counters(3, 30, 12), "600": _counters(25, 90, 12)}, "alerts": ["bulk_access", "denial_burst"], "allow": true},
	"a window no rule uses: quiet": {"activity": {"3600": _counters(500, 900, 90)}, "alerts": [], "allow": true},
	"empty activity: quiet": {"activity": {}, "alerts": [], "allow": true},
}

test_activity_thresholds[note] if {
	some note, case in _activity_cases
	d := authz.decision with input as _with_activity(case.activity)
	d.allow == case.allow
	d.audit.alerts == case.alerts
}

test_activity_rule_set_to_deny_denies_and_alerts if {
	rules := json.patch(data.mcp_fhir.config.activity.rules, [{"op": "replace", "path": "/bulk_access/action", "value": "deny"}])
	d := authz.decision with input as _with_activity({"600": _counters(21, 40, 0)})
		with data.mcp_fhir.config.activity.rules as rules
	not d.allow
	[r.code | some r in d.reasons] == ["ACCESS_PATTERN_DENIED"]
	contains(d.reasons[0].message, "bulk_access")
	d.audit.alerts == ["bulk_access"]
	quiet := authz.decision with input as _with_activity({"600": _counters(20, 40, 0)})
		with data.mcp_fhir.config.activity.rules as rules
	quiet.allow
}

test_malformed_activity_is_named[note] if {
	some note, activity in _malformed_activities
	d := authz.decision with input as _with_activity(activity)
	[r.code | some r in d.reasons] == ["INPUT_MALFORMED"]
	contains(d.reasons[0].message, "context.activity")
}

_malformed_activities := {
	"not an object": [1],
	"window not seconds": {"ten": _counters(1, 1, 0)},
	"a counter missing": {"60": {"calls": 1, "denials": 0}},
	"a negative counter": {"60": _counters(1, -1, 0)},
	"a fractional counter": {"60": _counters(1, 1.5, 0)},
	"an extra counter": {"60": object.union(_counters(1, 1, 0), {"errors": 1})},
}

# A data-driven test with no result passes in opa test: these pin that every case ran and passed.
test_every_activity_case_passes if count(test_activity_thresholds) == count(_activity_cases)

test_every_malformed_activity_is_named if count(test_malformed_activity_is_named) == count(_malformed_activities)

# _now: [day kind, hour, minute, second] in the configured zone (Sydney, UTC+10 in June).
test_now_gives_the_day_kind_and_the_local_clock[note] if {
	some note, case in {
		"Tuesday 11:00:05": ["2025-06-03T01:00:05Z", ["business", 11, 0, 5]],
		"Saturday 11:00": ["2025-06-07T01:00:00Z", ["other", 11, 0, 0]],
		"Monday 00:30 local, Sunday UTC": ["2025-06-01T14:30:00Z", ["business", 0, 30, 0]],
	}
	[t, want] := case
	anomalies._now == want with input as testing.patched(testing.clinician_obs, {"/context/time": t})
}

test_every_now_case_passes if count(test_now_gives_the_day_kind_and_the_local_clock) == 3
