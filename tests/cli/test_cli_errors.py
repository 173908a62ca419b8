"""Every `mcp-fhir` subcommand, given bad, missing and malformed arguments, exits non-zero with a one-line
error and never a traceback; every option has help text.

The argparse tree is walked, so a new subcommand or option is covered without editing this file: each
leaf gets an unknown option, its required arguments left out, and a malformed value for every option
that converts or restricts its value. Then each leaf gets the value-level mistakes a person makes
(missing and malformed files, a URL with the MCP path, an unknown tool). `serve` runs as a real process
(it configures the process's logging); the rest run in-process through `main()`.
"""

from __future__ import annotations

import argparse
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcp_fhir.cli.main import main, parser

REPO = Path(__file__).resolve().parents[2]
SUBPROCESS_TIMEOUT_S = 60.0


def leaves(
    p: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, p
        return
    for name, child in subs[0].choices.items():
        yield from leaves(child, (*path, name))


def all_parsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from all_parsers(child)


LEAVES = sorted(leaves(parser()), key=lambda leaf: leaf[0])
LEAF_IDS = [" ".join(path) for path, _ in LEAVES]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`main(argv)`: its exit status and everything it printed. Any exception escaping it fails the test."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_clean_failure(code: int, output: str) -> None:
    assert code != 0, output
    assert "Traceback" not in output, output
    assert "internal error" not in output, output  # handled on purpose, not by the last-resort guard


# --- the tree --------------------------------------------------------------------------------------------


def test_every_option_and_subcommand_has_help_text():
    missing = []
    for p in all_parsers(parser()):
        for action in p._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{p.prog} {c.dest}" for c in action._choices_actions if not c.help]
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{p.prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


@pytest.mark.parametrize(("path", "leaf"), LEAVES, ids=LEAF_IDS)
def test_an_unknown_option_is_a_usage_error(path, leaf, capsys):
    assert_clean_failure(*run([*path, "--no-such-option"], capsys))


def _required(leaf: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in leaf._actions if a.required and not isinstance(a, argparse._SubParsersAction)]


def _checked(leaf: argparse.ArgumentParser) -> list[argparse.Action]:
    """Options that convert or restrict their value (a type other than str/Path, or choices)."""
    return [
        a
        for a in leaf._actions
        if a.option_strings and a.nargs != 0 and (a.choices is not None or a.type not in (None, str, Path))
    ]


WITH_REQUIRED = [(path, leaf) for path, leaf in LEAVES if _required(leaf)]
WITH_CHECKED = [(path, leaf) for path, leaf in LEAVES if _checked(leaf)]


def test_the_walk_found_the_subcommands_and_options_it_checks():
    assert {"serve", "status", "config check", "keys new", "audit verify", "policy eval"} <= set(LEAF_IDS)
    assert len(WITH_REQUIRED) >= 3 and len(WITH_CHECKED) >= 5


@pytest.mark.parametrize(("path", "leaf"), WITH_REQUIRED, ids=[" ".join(p) for p, _ in WITH_REQUIRED])
def test_missing_required_arguments_are_a_usage_error(path, leaf, capsys):
    assert_clean_failure(*run(list(path), capsys))


@pytest.mark.parametrize(("path", "leaf"), WITH_CHECKED, ids=[" ".join(p) for p, _ in WITH_CHECKED])
def test_a_malformed_value_for_every_checked_option_is_a_usage_error(path, leaf, capsys):
    for action in _checked(leaf):
        assert_clean_failure(*run([*path, action.option_strings[-1], "!!malformed!!"], capsys))


def test_a_missing_subcommand_is_a_usage_error(capsys):
    for group in ("config", "keys", "audit", "policy"):
        assert_clean_failure(*run([group], capsys))
    assert_clean_failure(*run([], capsys))


# --- value-level mistakes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def html_server() -> Iterator[str]:
    """A loopback HTTP server that answers every GET with an HTML 404, as a reverse proxy would."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body>not found</body></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, str]:
    malformed_yaml = tmp_path / "malformed.yaml"
    malformed_yaml.write_text("server: [unclosed\n", encoding="utf-8")
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("no_such_section: {}\n", encoding="utf-8")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\xff not json\n{\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json", encoding="utf-8")
    return {
        "missing": str(tmp_path / "no-such-file"),
        "malformed_yaml": str(malformed_yaml),
        "invalid": str(invalid),
        "directory": str(tmp_path),
        "garbage": str(garbage),
        "bad_json": str(bad_json),
    }


def value_cases(files: dict[str, str], html: str) -> list[list[str]]:
    return [
        ["config", "check", files["missing"]],
        ["config", "check", files["malformed_yaml"]],
        ["config", "check", files["invalid"]],
        ["config", "check", files["directory"]],
        ["status", "--url", html + "/mcp"],
        ["status", "--url", "127.0.0.1:8765"],
        ["status", "--url", "http://127.0.0.1:1"],
        ["status", "--timeout", "-1"],
        ["keys", "new", "--id", "has spaces and !"],
        ["keys", "new", "--id", ""],
        ["audit", "verify", "--path", files["missing"]],
        ["audit", "verify", "--path", files["garbage"]],
        ["audit", "query", "--path", files["missing"]],
        ["audit", "query", "--path", files["garbage"], "--limit", "-5"],
        ["audit", "export", "--path", files["missing"]],
        ["audit", "export", "--path", files["directory"]],
        ["policy", "eval", "--input-json", "{not json"],
        ["policy", "eval", "--input", files["missing"]],
        ["policy", "eval", "--input", files["bad_json"]],
        ["policy", "eval", "--tool", "no_such_tool"],
        ["policy", "eval", "--policies", files["missing"], "--tool", "read_patient"],
        ["policy", "test", "--policies", files["missing"]],
        ["policy", "lint", "--policies", files["missing"]],
        ["policy", "bundle", "--signing-key", files["missing"], "-o", files["missing"] + ".tar.gz"],
        ["policy", "diff", "no-such-ref-a", "no-such-ref-b", "--quiet"],
    ]


def test_value_mistakes_in_every_subcommand_exit_non_zero_without_a_traceback(bad_files, html_server, capsys):
    failures = []
    for argv in value_cases(bad_files, html_server):
        code, output = run(argv, capsys)
        if code == 0 or "Traceback" in output or "internal error" in output:
            failures.append((argv, code, output[-500:]))
    assert not failures, failures


def test_status_with_the_mcp_path_says_what_the_url_should_be(html_server, capsys):
    code, output = run(["status", "--url", html_server + "/mcp"], capsys)
    assert code == 2
    assert "base URL" in output and "HTTP 404" in output


# --- the two crashes from the report, as a person runs them -----------------------------------------------


def cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_FHIR_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "mcp_fhir.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env=env,
        cwd=cwd,
        check=False,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--log-level", "verbose"],
        ["serve", "--transport", "carrier-pigeon"],
        ["serve", "--config", "no-such-file.yaml"],
        ["serve", "--config", "malformed.yaml"],
        ["serve", "--config", "invalid.yaml"],
        ["serve"],  # no --config and no $MCP_FHIR_CONFIG
    ],
    ids=["log-level", "transport", "missing-config", "malformed-config", "invalid-config", "no-config"],
)
def test_serve_with_bad_arguments_exits_non_zero_with_one_line_and_no_traceback(argv, bad_files, tmp_path):
    done = cli(*argv, cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip(), "no error was printed"


def test_status_against_an_mcp_url_exits_non_zero_with_no_traceback(html_server, tmp_path):
    done = cli("status", "--url", html_server + "/mcp", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1
