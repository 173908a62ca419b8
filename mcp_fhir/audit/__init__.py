"""The audit trail: durable, hash-chained, signed records of every tool call, written before data leaves.

The server holds one ``AuditTrail`` (``build_trail(AuditSettings)``), calls ``await trail.record(rec)``
for every call, and gets ``AuditUnavailable`` (code ``audit_unavailable``) when a record could not
be made durable. See ``trail.py`` for the write path, ``chain.py`` for the stored form,
``verify.py`` for what verification proves, and ``export_fhir.py`` for FHIR AuditEvent export.
"""

from mcp_fhir.audit.alerts import AlertEmitter, DenialBurstDetector
from mcp_fhir.audit.export_fhir import to_audit_event, to_bundle, to_ndjson
from mcp_fhir.audit.query import AuditQuery
from mcp_fhir.audit.record import AuditRecord, utc_now_ms
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import AuditTrail, build_trail
from mcp_fhir.audit.verify import Problem, VerifyReport, verify_file, verify_postgres, verify_sqlite

__all__ = [
    "AlertEmitter",
    "AuditQuery",
    "AuditRecord",
    "AuditSettings",
    "AuditTrail",
    "DenialBurstDetector",
    "Problem",
    "VerifyReport",
    "build_trail",
    "to_audit_event",
    "to_bundle",
    "to_ndjson",
    "utc_now_ms",
    "verify_file",
    "verify_postgres",
    "verify_sqlite",
]
