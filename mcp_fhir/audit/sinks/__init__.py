"""Audit sinks: file (JSON lines), SQLite, PostgreSQL and stdout. See ``base.AuditSink``."""

from mcp_fhir.audit.sinks.base import AuditSink, Opened, SinkError
from mcp_fhir.audit.sinks.file import FileSink
from mcp_fhir.audit.sinks.sqlite import SQLiteSink
from mcp_fhir.audit.sinks.stdout import StdoutSink

__all__ = ["AuditSink", "FileSink", "Opened", "SQLiteSink", "SinkError", "StdoutSink"]
