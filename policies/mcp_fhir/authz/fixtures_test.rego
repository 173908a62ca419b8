# METADATA
# title: Fixture corpus agreement
# description: policies/fixtures/decisions.json (loaded as data.fixtures) must agree with the policy.
package mcp_fhir.authz.fixtures_test

import data.mcp_fhir.authz

_agrees(case) if {
	decision := authz.decision with input as case.input
	decision.allow == case.expect.allow
	sort({r.code | some r in decision.reasons}) == case.expect.reasons
	_obligations_agree(decision, case.expect)
	_alerts_agree(decision, case.expect)
}

_obligations_agree(_, expect) if not expect.obligations

_obligations_agree(decision, expect) if decision.obligations == expect.obligations

_alerts_agree(_, expect) if not expect.alerts

_alerts_agree(decision, expect) if decision.audit.alerts == expect.alerts

test_fixture_corpus_has_at_least_thirty_cases if count(data.fixtures) >= 30

# Table-driven: one result per fixture case, named by its note (opa test -v lists each).
test_fixture_case[note] if {
	some case in data.fixtures
	note = case.note # before _agrees: the runner asks for each note, so only its case is decided
	_agrees(case)
}

test_fixture_notes_are_unique if count({case.note | some case in data.fixtures}) == count(data.fixtures)

test_fixture_corpus_covers_allow_and_deny if {
	some a in data.fixtures
	a.expect.allow == true
	some d in data.fixtures
	d.expect.allow == false
}

# A data-driven test with no result passes in opa test: this pins that every case ran and passed.
test_every_fixture_case_passes if count(test_fixture_case) == count(data.fixtures)
