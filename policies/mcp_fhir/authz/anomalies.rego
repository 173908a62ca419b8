# METADATA
# title: Anomalies
# description: >-
#   Alerts never change allow; they tell the audit trail and the SOC what to look at.
#   after_hours: outside the business hours in data. break_glass: break-glass was invoked.
package mcp_fhir.authz.anomalies

import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.sensitivity
import data.mcp_fhir.config.hours as _hours
import data.mcp_fhir.derived as _derived

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

# _in_hours: the request's instant falls on a business day, at or after start and before end, in
# the configured time zone. The instant is parsed once (request.time_ns). While the derived table
# is fresh, the days are an object lookup and start/end are [hour, minute, 0] arrays compared with
# time.clock's [hour, minute, second] as a whole (no arithmetic per request); else business_hours
# computes the same from the YAML.
_in_hours if {
	_derived_fresh
	ns := request.time_ns
	tz := _hours.timezone
	_derived.hours.days[time.weekday([ns, tz])]
	clock := time.clock([ns, tz])
	clock >= _derived.hours.start
	clock < _derived.hours.end
} else if {
	not _derived_fresh
	business_hours(request.time_ns, _hours)
}

_derived_fresh if _derived.source.hours == _hours

# alerts raised for any well-formed request.
alerts contains "after_hours" if not _in_hours

alerts contains "break_glass" if sensitivity.break_glass_invoked
