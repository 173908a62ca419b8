# METADATA
# title: Anomalies
# description: >-
#   Alerts never change allow; they tell the audit trail and the SOC what to look at.
#   after_hours: outside the business hours in data. break_glass: break-glass was invoked.
#   consent_overridden: break-glass set a patient's consent aside. Activity rules (config/activity)
#   raise their own name (bulk_access, denial_burst) on input.context.activity, and deny
#   (ACTIVITY_DENIED) where their action is deny.
package mcp_fhir.authz.anomalies

import data.mcp_fhir.authz.consent
import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.sensitivity
import data.mcp_fhir.config.activity as _activity
import data.mcp_fhir.config.hours as _hours

# minutes turns "HH:MM" into minutes after midnight.
minutes(hhmm) := ((to_number(concat("", ["1", parts[0]])) - 100) * 60) + (to_number(concat("", ["1", parts[1]])) - 100) if {
	parts := split(hhmm, ":")
}

# business_hours is true when instant ns (epoch nanoseconds) falls inside hours.
business_hours(ns, hours) if {
	time.weekday([ns, hours.timezone]) in hours.days
	[h, m, _] := time.clock([ns, hours.timezone])
	now := (h * 60) + m
	now >= minutes(hours.start)
	now < minutes(hours.end)
}

# The configured hours as nanoseconds after midnight, computed once per evaluation: "08:00"
# becomes the duration "08h00m" (one builtin instead of the split/concat/to_number of minutes),
# written out in each rule (a helper function would cost two more steps per call).
_start_ns := time.parse_duration_ns(concat("", [replace(_hours.start, ":", "h"), "m"]))

_end_ns := time.parse_duration_ns(concat("", [replace(_hours.end, ":", "h"), "m"]))

_in_hours if {
	ns := request.time_ns
	tz := _hours.timezone
	time.weekday([ns, tz]) in _hours.days
	[h, m, _] := time.clock([ns, tz])
	now := ((h * 60) + m) * 60000000000
	now >= _start_ns
	now < _end_ns
}

# alerts raised for any well-formed request.
alerts contains "after_hours" if not _in_hours

alerts contains "break_glass" if sensitivity.break_glass_invoked

alerts contains "consent_overridden" if consent.overridden

# activity_hits: the activity rules whose threshold this subject's counts reach.
activity_hits contains name if {
	request.well_formed
	counts := input.context.activity
	some name, rule in _activity.rules
	counts[rule.window][rule.measure] >= rule.at_least
}

alerts contains name if some name in activity_hits

# METADATA
# title: Activity denied
# description: The subject's recent activity reached a threshold the policy denies on
# custom:
#   code: ACTIVITY_DENIED
deny contains {"code": "ACTIVITY_DENIED", "message": "The subject's recent activity reached a threshold the policy denies on"} if {
	some name in activity_hits
	_activity.rules[name].action == "deny"
}

# activity_unavailable: the sidecar's activity counters could not be read for this call.
alerts contains "activity_unavailable" if {
	request.well_formed
	input.context.activity.status == "unavailable"
}

# METADATA
# title: Activity unavailable
# description: The subject's recent activity could not be counted; denied where the policy's data says so
# custom:
#   code: ACTIVITY_UNAVAILABLE
deny contains {"code": "ACTIVITY_UNAVAILABLE", "message": "The subject's recent activity could not be counted; denied where the policy's data says so"} if {
	"activity_unavailable" in alerts
	_activity.on_unavailable == "deny"
}
