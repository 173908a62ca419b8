"""The decision corpus: a fixed sample of it evaluates deterministically and compares equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.decision_corpus import OPA, corpus, main

POLICIES = Path("policies")

pytestmark = pytest.mark.skipif(not OPA.exists(), reason="needs .tools/bin/opa")


def test_corpus_is_fixed_by_its_seed_and_covers_malformed_and_visible_tools_inputs():
    first, second = corpus(POLICIES, 200), corpus(POLICIES, 200)
    assert first == second
    assert any(isinstance(case, dict) and "action" not in case for case in first)  # visible_tools inputs
    assert any(not isinstance(case, dict) for case in first)  # top-level malformed inputs


def test_a_sample_compares_equal_with_itself_and_differs_from_an_edited_output(tmp_path):
    out = tmp_path / "corpus.jsonl"
    assert main(["--size", "100", "--sample", "40", "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    inputs = [json.dumps(json.loads(line)["input"], sort_keys=True, ensure_ascii=True) for line in lines]
    assert inputs == sorted(inputs)
    assert any('"allow": true' in line for line in lines)
    assert main(["--size", "100", "--sample", "40", "--against", str(out)]) == 0
    out.write_text("\n".join([lines[0].replace('"allow": false', '"allow": true'), *lines[1:]]) + "\n")
    assert main(["--size", "100", "--sample", "40", "--against", str(out)]) == 1


def test_the_server_with_a_read_optimised_store_decides_the_sample_as_opa_eval_does(tmp_path):
    out = tmp_path / "corpus.jsonl"
    assert main(["--size", "60", "--sample", "50", "--out", str(out)]) == 0
    flags = "--server-flags=--optimize-store-for-read-speed"
    assert main(["--size", "60", "--sample", "50", "--server", flags, "--against", str(out)]) == 0
