"""`AppContext` is a plain bag of clients: the active engine is the decider's, backends are looked up by name."""

from __future__ import annotations

from mcp_fhir.audit.fake import FakeAuditTrail
from mcp_fhir.context import AppContext, IdentityIds
from mcp_fhir.ehr.client import FakeEHRClient
from mcp_fhir.policy.decide import Decider
from mcp_fhir.policy.engine import FakePolicyEngine


def _app() -> tuple[AppContext, FakePolicyEngine, FakeEHRClient, FakeEHRClient]:
    engine, trail = FakePolicyEngine(), FakeAuditTrail()
    a, b = FakeEHRClient(), FakeEHRClient()
    app = AppContext(
        decider=Decider(engine, audit=trail.record),
        backends={"a": a, "b": b},
        default_backend="a",
        idmap=IdentityIds(),
        audit=trail,
        continuation_key=b"k" * 32,
    )
    return app, engine, a, b


def test_the_engine_is_the_deciders_active_engine():
    app, engine, _a, _b = _app()
    assert app.engine is engine


def test_a_backend_is_found_by_name_and_the_default_by_none():
    app, _engine, a, b = _app()
    assert (app.backend(), app.backend("b")) == (a, b)


def test_the_repr_never_shows_the_continuation_key():
    app, *_ = _app()
    assert "kkkk" not in repr(app)
