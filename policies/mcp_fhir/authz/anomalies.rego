# METADATA
# title: Anomalies
# description: >-
#   Alerts never change allow; they tell the audit trail and the SOC what to look at.
#   after_hours: outside the business hours in data. break_glass: break-glass was invoked.
package mcp_fhir.authz.anomalies

import data.mcp_fhir.authz.consent
import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.sensitivity
import data.mcp_fhir.config.activity as _activity
import data.mcp_fhir.config.defaults as _defaults
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

# _in_hours: the request's instant falls on a business day, inside business hours, in the
# configured time zone. The instant is parsed once (request.time_ns) and the zone applied once per
# builtin (_clock, _weekday: one time.clock and one time.weekday per decision, shared with
# valid_for_s). While the derived table is fresh, the day and the local [hour][minute] are lookups
# (no arithmetic per request); else business_hours computes the same from the YAML.
_in_hours if {
	_derived_fresh
	_business_day
	[h, m, _] := _clock
	_derived.hours.in_hours[h][m]
} else if {
	not _derived_fresh
	business_hours(request.time_ns, _hours)
}

_clock := time.clock([request.time_ns, _hours.timezone])

_weekday := time.weekday([request.time_ns, _hours.timezone])

_business_day if {
	_derived_fresh
	_derived.hours.days[_weekday]
} else if {
	not _derived_fresh
	_weekday in _hours.days
}

# valid_for_s: how long, in whole seconds from the request's instant, this decision stays what the
# policy would decide for the same input: until the next business-hours boundary (end of hours,
# start of hours later today, else midnight, when the weekday changes), less one second for the
# instant's fraction, and never more than defaults.decision_valid_for_s. Only after_hours depends on
# the time, so this is the whole of the decision's lifetime. 0 for a malformed input.
default valid_for_s := 0

valid_for_s := min({_defaults.decision_valid_for_s, _left(h, m) - s}) if [h, m, s] := _clock

# _left: seconds from hh:mm:00 to the next boundary, less one: a lookup in the derived table, else
# computed from the YAML.
_left(h, m) := _derived.hours.left[_day_kind][h][m] if {
	_derived_fresh
} else := ((_next_boundary(now) - now) * 60) - 1 if {
	now := (h * 60) + m
}

_day_kind := "business" if _business_day

else := "other"

_next_boundary(now) := minutes(_hours.end) if {
	_business_day
	now >= minutes(_hours.start)
	now < minutes(_hours.end)
} else := minutes(_hours.start) if {
	_business_day
	now < minutes(_hours.start)
} else := 1440

_derived_fresh if _derived.source.hours == _hours

# alerts raised for any well-formed request.
alerts contains "after_hours" if not _in_hours

alerts contains "break_glass" if sensitivity.break_glass_invoked

alerts contains alert if some alert in consent.alerts

# Access-pattern alerts: every tripped rule of config/activity, whatever its action (a deny rule
# alerts too, so the audit trail says why). Nothing is evaluated without context.activity.
alerts contains name if some name in tripped

# tripped: the names of the activity rules whose counter, in the rule's window, is at least the
# threshold.
tripped contains name if {
	counters := request.activity
	some name, rule in _activity.rules
	counters[format_int(rule.window_s, 10)][rule.counter] >= rule.at_least
}

# denied_patterns: the tripped rules whose action is deny.
denied_patterns contains name if {
	some name in tripped
	_activity.rules[name].action == "deny"
}
