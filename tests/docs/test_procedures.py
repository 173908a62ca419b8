"""Issue #17 (4): every documented procedure runs in CI, exactly as the doc writes it
(`tests/docs/procedures.py` says how a doc marks one). A doc change that breaks one turns CI red."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests.docs.procedures import ProcedureError, discover, parse, run, sandbox

PROCEDURES = discover()


def test_the_docs_hold_procedures_to_run():
    assert len(PROCEDURES) >= 1


# A procedure runs the steps of those it needs first (each bounded by STEP_TIMEOUT): `policy test` twice,
# or the test bed, a server and an audit trail, take minutes on a shared 2-core machine.
@pytest.mark.integration
@pytest.mark.timeout(900)
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


ORDER_DOC = """
<!-- procedure: order -->
```sh run
printf 'second\\nfirst\\n'
```
```text expect{attrs}
first
second
```
<!-- /procedure -->
"""


def test_an_unordered_expectation_accepts_its_lines_in_any_order_and_an_ordered_one_does_not(tmp_path: Path):
    (unordered,) = parse(ORDER_DOC.format(attrs=" unordered"))
    run(unordered, tmp_path)
    (ordered,) = parse(ORDER_DOC.format(attrs=""))
    with pytest.raises(ProcedureError):
        run(ordered, tmp_path)


def test_an_unclosed_or_empty_procedure_is_refused():
    with pytest.raises(ProcedureError):
        parse("<!-- procedure: a -->\n```sh run\ntrue\n```\n")
    with pytest.raises(ProcedureError):
        parse("<!-- procedure: a -->\nprose only\n<!-- /procedure -->")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _background_doc(port: int, command: str, extra: str = "") -> str:
    return f"""
<!-- procedure: served -->
```sh background ready=http://127.0.0.1:{port}/ {extra}
echo $$ > server.pid
{command}
```
```sh run
python -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/').status)"
```
```text expect
200
```
<!-- /procedure -->
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_background_step_is_ready_before_the_next_step_and_stopped_when_the_procedure_ends(tmp_path: Path):
    port = _free_port()
    (procedure,) = parse(_background_doc(port, f"exec python -m http.server {port} --bind 127.0.0.1"))
    run(procedure, tmp_path)
    pid = int((tmp_path / "server.pid").read_text())
    assert not _alive(pid)


def test_a_background_step_is_stopped_when_a_later_step_fails(tmp_path: Path):
    port = _free_port()
    doc = _background_doc(port, f"exec python -m http.server {port} --bind 127.0.0.1").replace("200", "201")
    (procedure,) = parse(doc)
    with pytest.raises(ProcedureError):
        run(procedure, tmp_path)
    assert not _alive(int((tmp_path / "server.pid").read_text()))


@pytest.mark.parametrize(
    ("command", "extra"),
    [("exit 4", ""), ("exec sleep 30", "timeout=1")],
    ids=["exits before ready", "never ready"],
)
def test_a_background_step_that_never_answers_fails_within_its_bound(
    command: str, extra: str, tmp_path: Path
):
    (procedure,) = parse(_background_doc(_free_port(), command, extra))
    started = time.monotonic()
    with pytest.raises(ProcedureError):
        run(procedure, tmp_path)
    assert time.monotonic() - started < 15
    assert not _alive(int((tmp_path / "server.pid").read_text()))


def test_a_background_step_without_a_readiness_url_is_refused():
    with pytest.raises(ProcedureError):
        parse("<!-- procedure: a -->\n```sh background\ntrue\n```\n```sh run\ntrue\n```\n<!-- /procedure -->")


NEEDS = """
<!-- procedure: first -->
```text file=a.txt
one
```
```sh run
true
```
<!-- /procedure -->

<!-- procedure: second needs=first -->
```sh run
cat a.txt
```
```text expect
one
```
<!-- /procedure -->
"""


def test_a_procedure_that_needs_another_runs_its_steps_first(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(NEEDS)
    first, second = discover(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    run(second, work)
    assert (work / "a.txt").read_text() == "one\n"
    assert len(second.steps) == len(first.steps) + 2


@pytest.mark.parametrize(
    "doc",
    [
        NEEDS.replace("needs=first", "needs=third"),
        NEEDS.replace("procedure: first -->", "procedure: first needs=second -->"),
    ],
    ids=["unknown", "circular"],
)
def test_a_procedure_needing_an_unknown_or_circular_one_is_refused(doc: str, tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(doc)
    with pytest.raises(ProcedureError):
        discover(tmp_path)
