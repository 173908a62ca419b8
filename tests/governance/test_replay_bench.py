"""bench/replay.py runs end to end on a small trail: a real chained trail, the real diff, its figures."""

from __future__ import annotations

import json

from bench.replay import main, write_trail
from mcp_fhir.audit.chain import GENESIS, entry_hash
from tests.governance.minipolicy import write_policies


def test_the_bench_trail_is_a_hash_chain_of_access_records_with_distinct_inputs(tmp_path, opa_binary):
    policies = write_policies(tmp_path / "policies")
    trail = tmp_path / "audit.jsonl"
    write_trail(trail, 50, policies)
    entries = [json.loads(line) for line in trail.read_text().splitlines()]
    assert len(entries) == 50
    prev = GENESIS
    for seq, entry in enumerate(entries, start=1):
        assert (entry["seq"], entry["prev"], entry["hash"]) == (seq, prev, entry_hash(entry))
        prev = entry["hash"]
    inputs = {json.dumps(e["record"]["decision_input"], sort_keys=True) for e in entries}
    assert len(inputs) == 50


def test_the_bench_replays_a_trail_and_prints_its_rate(tmp_path, capsys, opa_binary):
    assert main(["--records", "200", "--keep", str(tmp_path), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["records"] == figures["inputs"] == figures["distinct_inputs"] == 200
    assert figures["inputs_per_s"] > 0 and figures["inputs_per_cpu_s"] > 0
    cpu = figures["cpu_s"]
    assert cpu["opa_base"] > 0 and cpu["opa_head"] > 0 and cpu["read"] > 0
    assert cpu["total"] >= sum(v for k, v in cpu.items() if k != "total") - 0.01
    # the bench's head widens the nurse role: any widened input is unapproved, as intended
    assert figures["exit_code"] == (1 if figures["counts"]["widening"] else 0)
