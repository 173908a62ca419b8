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
