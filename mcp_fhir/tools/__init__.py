"""The tools, declared. `all_tools()` is every tool this server offers, in listing order.

clinical.py  read_patient, search_* (one `search_family` entry each), list_documents, patient_summary
notes.py     read_document, create_clinical_note
admin.py     refresh, search_audit_log
disclosures.py  audit_disclosures (the accounting of disclosures)
declare.py   what a declaration is: `Tool`, `ToolArgs`, `Fetched`, `Enforced`
callpath.py  `CallPath.run`: steps 1-9, in order, for every tool
results.py   one result model and one render function per output shape
params.py    the typed parameter annotations
"""

from __future__ import annotations

from mcp_fhir.tools import admin, clinical, disclosures, notes
from mcp_fhir.tools.callpath import CallPath
from mcp_fhir.tools.declare import Tool

__all__ = ["CallPath", "Tool", "all_tools"]


def all_tools() -> tuple[Tool, ...]:
    """Every tool, declared (a fresh refresh limiter each time: one per server)."""
    return (*clinical.TOOLS, *notes.TOOLS, *admin.tools(), *disclosures.TOOLS)
