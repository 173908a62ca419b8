"""Structured JSON logs: allow-listed fields, request and trace ids, and nothing shaped like a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from mcp_fhir.logs import JsonFormatter, RequestContextMiddleware, bind_request, current_ids, redact

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("mcp_fhir.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    access = logging.getLogger("mcp_fhir.http")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        access.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_log_line_is_one_json_object_with_time_level_logger_and_message(captured):
    logging.getLogger("mcp_fhir.test_logs").info("backend ready", extra={"backend": "epic"})
    [line] = lines(captured)
    assert line["level"] == "info" and line["logger"] == "mcp_fhir.test_logs"
    assert line["msg"] == "backend ready" and line["backend"] == "epic"
    assert line["ts"].endswith("Z")


def test_extras_that_are_not_on_the_allow_list_are_dropped(captured):
    logging.getLogger("mcp_fhir.test_logs").info(
        "call", extra={"tool": "read_patient", "patient": "pat-au-001", "family": "Citizen"}
    )
    [line] = lines(captured)
    assert line["tool"] == "read_patient"
    assert "patient" not in line and "family" not in line
    assert "pat-au-001" not in json.dumps(line)


def test_lines_inside_a_bound_request_carry_its_request_and_trace_ids(captured):
    with bind_request("req-12345678", TRACE_ID):
        logging.getLogger("mcp_fhir.test_logs").info("inside")
    logging.getLogger("mcp_fhir.test_logs").info("outside")
    inside, outside = lines(captured)
    assert (inside["request_id"], inside["trace_id"]) == ("req-12345678", TRACE_ID)
    assert "request_id" not in outside and current_ids() == (None, None)


def test_an_exception_is_logged_by_type_only(captured):
    try:
        raise ValueError("Jane Citizen, DOB 1984-03-09")
    except ValueError:
        logging.getLogger("mcp_fhir.test_logs").exception("failed")
    [line] = lines(captured)
    assert line["error"] == "ValueError"
    assert "Citizen" not in json.dumps(line) and "Traceback" not in json.dumps(line)


@pytest.mark.parametrize(
    "secret",
    [
        "Bearer abcdefghijklmnop.qrstuv",
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJl",
        "mfk_AbCdEfGhIjKlMnOpQrStUv",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQ\n-----END PRIVATE KEY-----",
        "client_secret=hunter2-not-real",
    ],
)
def test_anything_shaped_like_a_credential_is_redacted_even_in_message_text(captured, secret):
    logging.getLogger("mcp_fhir.test_logs").warning("upstream said %s", secret)
    [line] = lines(captured)
    assert "[secure]" in line["msg"]
    assert secret not in line["msg"]
    assert redact(f"x {secret} y").startswith("x [secure]")


async def _drive(path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    sent: list[dict] = []
    seen_ids: list[tuple[str | None, str | None]] = []

    async def app(scope, receive, send):
        seen_ids.append(current_ids())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    wrapped = RequestContextMiddleware(app, mcp_path="/mcp")
    scope = {"type": "http", "method": "GET", "path": path, "headers": headers, "query_string": b"token=x"}
    await wrapped(scope, receive, send)
    return {"start": sent[0], "ids": seen_ids[0]}


async def test_the_middleware_binds_ids_echoes_the_request_id_and_honours_traceparent(captured):
    out = await _drive("/mcp", [(b"traceparent", TRACEPARENT.encode()), (b"x-request-id", b"agent-req-0001")])
    assert out["ids"] == ("agent-req-0001", TRACE_ID)
    assert (b"x-request-id", b"agent-req-0001") in out["start"]["headers"]
    [line] = lines(captured)
    assert (line["route"], line["status"], line["method"]) == ("/mcp", 204, "GET")
    assert (line["request_id"], line["trace_id"]) == ("agent-req-0001", TRACE_ID)


async def test_the_middleware_replaces_an_unsafe_request_id_and_hides_unknown_paths(captured):
    out = await _drive("/fhir/Patient/pat-au-001", [(b"x-request-id", b"<script>")])
    request_id, trace_id = out["ids"]
    assert request_id != "<script>" and len(request_id) == 32 and len(trace_id) == 32
    [line] = lines(captured)
    assert line["route"] == "(other)"
    assert "pat-au-001" not in json.dumps(line) and "token=x" not in json.dumps(line)


def test_a_bad_format_string_keeps_the_line_and_does_not_leak_its_arguments(captured, monkeypatch):
    logger = logging.getLogger("mcp_fhir.test_logs")
    monkeypatch.setattr(logger, "propagate", False)  # pytest's own capture handler raises on bad formats
    logger.warning("two slots %s %s", "pat-au-001")
    [line] = lines(captured)
    assert line["msg"] == "two slots %s %s"
    assert "pat-au-001" not in json.dumps(line)


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    import structlog

    from mcp_fhir.logs import configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging("INFO", stream)
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()


def test_a_structlog_logger_writes_through_the_same_allow_list_and_redaction(configured):
    import structlog

    log = structlog.get_logger("mcp_fhir.test_logs.native")
    with bind_request("req-abcdefgh", TRACE_ID):
        log.warning("upstream said Bearer abcdefghijklmnop", tool="read_patient", patient="pat-au-001")
    [line] = lines(configured)
    assert (line["logger"], line["level"], line["tool"]) == (
        "mcp_fhir.test_logs.native",
        "warning",
        "read_patient",
    )
    assert (line["request_id"], line["trace_id"]) == ("req-abcdefgh", TRACE_ID)
    assert "[secure]" in line["msg"] and "abcdefghijklmnop" not in line["msg"]
    assert "patient" not in line and "pat-au-001" not in json.dumps(line)


def test_a_structlog_exception_is_logged_by_type_only(configured):
    import structlog

    try:
        raise KeyError("Jane Citizen")
    except KeyError:
        structlog.get_logger("mcp_fhir.test_logs.native").exception("failed")
    [line] = lines(configured)
    assert line["error"] == "KeyError"
    assert "Citizen" not in json.dumps(line) and "Traceback" not in json.dumps(line)


def test_the_level_filter_applies_to_structlog_loggers(configured):
    import structlog

    structlog.get_logger("mcp_fhir.test_logs.native").debug("hidden")
    assert lines(configured) == []
