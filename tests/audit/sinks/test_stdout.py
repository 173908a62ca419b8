"""The stdout sink writes verifiable JSON lines to its stream."""

from __future__ import annotations

import io
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcp_fhir.audit.crypto import CheckpointSigner
from mcp_fhir.audit.sinks.stdout import StdoutSink
from mcp_fhir.audit.trail import AuditTrail
from mcp_fhir.audit.verify import verify_entries

from ..conftest import make_record


async def test_the_stdout_sink_emits_a_chain_that_verifies() -> None:
    stream = io.StringIO()
    key = Ed25519PrivateKey.generate()
    trail = AuditTrail(StdoutSink(stream), signer=CheckpointSigner(key), writer_id="w")
    await trail.start()
    for n in range(7):
        await trail.record(make_record(n))
    await trail.close()
    items = [(i, json.loads(line), False) for i, line in enumerate(stream.getvalue().splitlines(), 1)]
    report = verify_entries(items, public_key=key.public_key())
    assert report.ok, report.problem
    assert report.records == 7 and report.checkpoints == 7
