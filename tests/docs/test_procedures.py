"""Issue #17 (4): every documented procedure runs in CI, exactly as the doc writes it
(`tests/docs/procedures.py` says how a doc marks one). A doc change that breaks one turns CI red."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.procedures import ProcedureError, discover, parse, run, sandbox

PROCEDURES = discover()


def test_the_docs_hold_procedures_to_run():
    assert len(PROCEDURES) >= 1


@pytest.mark.integration
@pytest.mark.parametrize("procedure", PROCEDURES, ids=[f"{p.source}:{p.name}" for p in PROCEDURES])
def test_a_documented_procedure_does_what_its_doc_says(procedure, tmp_path: Path):
    run(procedure, sandbox(tmp_path / "repo"))


DOC = """
<!-- procedure: demo -->
```yaml file=conf.yaml merge
a: {b: 2}
```
```sh run
cat conf.yaml; echo '{"x": {"y": 1, "z": 2}}' > out.json
```
```text expect
b: 2
```
```sh run exit=3
cat out.json; exit 3
```
```json expect
{"x": {"y": 1}}
```
<!-- /procedure -->
"""


def test_a_procedure_applies_its_snippets_runs_its_commands_and_checks_their_output(tmp_path: Path):
    (tmp_path / "conf.yaml").write_text("a: {c: 1}\n")
    (procedure,) = parse(DOC)
    run(procedure, tmp_path)
    assert "c: 1" in (tmp_path / "conf.yaml").read_text()


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        (DOC.replace("b: 2\n```\n```sh", "b: 3\n```\n```sh"), "expected text missing"),
        (DOC.replace("exit=3", "exit=0"), "exit code differs"),
        (DOC.replace('{"x": {"y": 1}}', '{"x": {"y": 5}}'), "JSON not contained"),
    ],
)
def test_a_procedure_whose_doc_and_behaviour_disagree_fails(broken: str, why: str, tmp_path: Path):
    (procedure,) = parse(broken)
    with pytest.raises(ProcedureError):
        run(procedure, tmp_path)


def test_an_unclosed_or_empty_procedure_is_refused():
    with pytest.raises(ProcedureError):
        parse("<!-- procedure: a -->\n```sh run\ntrue\n```\n")
    with pytest.raises(ProcedureError):
        parse("<!-- procedure: a -->\nprose only\n<!-- /procedure -->")
