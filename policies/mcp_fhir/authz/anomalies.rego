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
# configured time zone. While the derived table is fresh, _now gives the day's kind and the local
# hour and minute in one rule, and the minute is a lookup (no arithmetic per request); else
# business_hours computes the same from the YAML.
_in_hours if {
	_derived_fresh
	[kind, h, m, _] := _now
	kind == "business"
	_derived.hours.in_hours[h][m]
} else if {
	not _derived_fresh
	business_hours(request.time_ns, _hours)
}

# _now: [day kind, hour, minute, second] of the request's instant in the configured time zone: the
# instant parsed once (request.time_ns), the zone applied by one time.clock and one time.weekday;
# the kind ("business" or "other", the keys of the derived left table) read from the derived table,
# so _now is used only while that table is fresh.
_now := [kind, h, m, s] if {
	at := [request.time_ns, _hours.timezone]
	[h, m, s] := time.clock(at)
	kind := object.get(_derived.hours.kind, time.weekday(at), "other")
}

# valid_for_s: how long, in whole seconds from the request's instant, this decision stays what the
# policy would decide for the same input: until the next business-hours boundary (end of hours,
# start of hours later today, else midnight, when the weekday changes), less one second for the
# instant's fraction, and never more than defaults.decision_valid_for_s. Only after_hours depends on
# the time, so this is the whole of the decision's lifetime. 0 for a malformed input. The seconds
# left from hh:mm:00 are a lookup in the derived table while it is fresh, else computed from the YAML.
default valid_for_s := 0

valid_for_s := min({_defaults.decision_valid_for_s, _derived.hours.left[kind][h][m] - s}) if {
	[kind, h, m, s] := _now # first: undefined for a malformed input
	_derived_fresh
} else := min({_defaults.decision_valid_for_s, (((_next_boundary(now) - now) * 60) - 1) - s}) if {
	[h, m, s] := time.clock([request.time_ns, _hours.timezone])
	not _derived_fresh
	now := (h * 60) + m
}

# _business_day (the YAML path only): the instant's weekday is one of the configured days.
_business_day if time.weekday([request.time_ns, _hours.timezone]) in _hours.days

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
