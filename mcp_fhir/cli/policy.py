"""``mcp-fhir policy``: test, lint, explain, diff and bundle the Rego policy.

    mcp-fhir policy test   [--policies DIR] [--threshold 95]
    mcp-fhir policy lint   [--policies DIR]
    mcp-fhir policy eval   [--policies DIR] (--input FILE | --input-json '{...}' | --tool T [--role R]
                           [--purpose P] [--patient ID] [--scope S]... [--break-glass REASON]
                           [--time RFC3339] [--claim k=v]...) [--json]
    mcp-fhir policy diff   BASE HEAD [--replay TRAIL]... [--no-fixtures] [--no-grid] [--full-grid]
                           [--approvals FILE] [--format md|json] [--out FILE] [--html FILE]
                           [--full-md FILE] [--json-out FILE] [--max-chars N] [--fail-on-narrowing]
                           [--cpu-out FILE]
    mcp-fhir policy bundle --signing-key priv.pem [--verification-key pub.pem] -o bundle.tar.gz
                           [--revision R] [--policies DIR]
    mcp-fhir policy opa-config --verification-key pub.pem --service-url URL [--resource bundle.tar.gz]
    mcp-fhir policy build  [--policies DIR] [--check]

BASE and HEAD are git refs (``policies/`` is read at each with ``git archive``), ``WORKTREE`` (the
working tree's ``policies/``), or folders (a ``policies/`` folder, or a folder that holds one). A
HEAD ref naming the checked-out commit while ``policies/`` has uncommitted changes is refused
(exit 2): the diff would not see those edits; diff against ``WORKTREE`` instead. Approvals are read
from BASE (the protected branch) unless ``--approvals`` names a file; a HEAD that edits
``approvals.yaml`` is reported as a widening that needs review. Exit codes: 0 ok; 1 a test, lint
or signature failed, or the diff found an unapproved widening or an approvals change; 2 usage or
configuration error. Progress goes to stderr; reports to stdout or ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mcp_fhir._exceptions import ConfigError

__all__ = ["add_parser"]

EXIT_OK = 0
EXIT_FAILED = 1
DEFAULT_POLICIES = Path("policies")
DEFAULT_GIT_TIMEOUT = 60.0
CLI_SUBJECT_ID = "policy-cli"
WORKTREE = "WORKTREE"  # pseudo-ref: the working tree's policies/, committed or not
PR_COMMENT_LIMIT = 65_536  # characters in a GitHub pull-request comment
DEFAULT_MAX_CHARS = 60_000  # the markdown summary stays under the comment limit with room to spare


def add_parser(subparsers: Any) -> None:
    """Add ``policy`` and its subcommands to a parent parser's subparsers."""
    policy = subparsers.add_parser("policy", help="test, lint, explain, diff and bundle the Rego policy")
    sub = policy.add_subparsers(dest="policy_command", required=True)

    test = sub.add_parser("test", help="run the Rego tests with coverage against the real OPA")
    test.add_argument(
        "--policies", type=Path, default=DEFAULT_POLICIES, help="policy folder (default policies/)"
    )
    test.add_argument("--threshold", type=float, default=95.0, help="minimum coverage %% (default 95)")
    test.add_argument("--json", action="store_true", help="machine-readable output")
    test.set_defaults(func=run_test)

    lint = sub.add_parser("lint", help="opa fmt, opa check --strict, and Regal when installed")
    lint.add_argument(
        "--policies", type=Path, default=DEFAULT_POLICIES, help="policy folder (default policies/)"
    )
    lint.set_defaults(func=run_lint)

    ev = sub.add_parser(
        "eval", help="decide one input and show reasons, obligations and the rules that fired"
    )
    ev.add_argument(
        "--policies", type=Path, default=DEFAULT_POLICIES, help="policy folder (default policies/)"
    )
    ev.add_argument("--input", type=Path, help="a decision input JSON file")
    ev.add_argument("--input-json", help="a decision input as inline JSON")
    ev.add_argument("--tool", help="tool name (fills operation and resource type from the catalogue)")
    ev.add_argument("--resource-type", help="override the catalogue's (first) resource type")
    ev.add_argument("--role", action="append", default=[], help="a role claim value (repeatable)")
    ev.add_argument("--purpose", help="purpose of use code")
    ev.add_argument("--patient", help="canonical patient id the call is about")
    ev.add_argument("--scope", action="append", default=[], help="a granted scope (repeatable)")
    ev.add_argument("--break-glass", metavar="REASON", help="claim break-glass with this reason")
    ev.add_argument("--time", help="RFC 3339 instant (default now)")
    ev.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="K=V",
        help="an extra raw claim; V is parsed as JSON when it is valid JSON (true, 5, '\"text\"'), "
        "else kept as a string",
    )
    ev.add_argument(
        "--authn", default="oauth", choices=["oauth", "api_key", "local"], help="how the caller authenticated"
    )
    ev.add_argument("--all-rules", action="store_true", help="list private helper rules too")
    ev.add_argument("--json", action="store_true", help="machine-readable output")
    ev.set_defaults(func=run_eval)

    diff = sub.add_parser("diff", help="replay decision inputs against two policy versions")
    diff.add_argument("base", help="git ref, WORKTREE, or folder (approvals are read from here)")
    diff.add_argument("head", help="git ref, WORKTREE (uncommitted edits included), or folder")
    diff.add_argument("--policies-path", default="policies", help="policies folder inside the repository")
    diff.add_argument("--repo", type=Path, default=Path("."), help="git repository for refs (default .)")
    diff.add_argument("--replay", type=Path, action="append", default=[], help="audit trail (repeatable)")
    diff.add_argument("--encryption-key-file", help="base64 AES-256 key for an encrypted trail")
    diff.add_argument("--encryption-key-env", help="NAME of the variable holding that key")
    diff.add_argument("--no-fixtures", action="store_true", help="skip policies/fixtures/*.json")
    diff.add_argument("--no-grid", action="store_true", help="skip the generated grid")
    diff.add_argument("--full-grid", action="store_true", help="cross every claim and label dimension")
    diff.add_argument("--approvals", type=Path, help="approvals file (default: BASE's approvals.yaml)")
    diff.add_argument("--format", choices=["md", "json"], default="md", help="report format (default md)")
    diff.add_argument("--out", type=Path, help="write the report here instead of stdout")
    diff.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                      help=f"size cap of the markdown summary (default {DEFAULT_MAX_CHARS}; a PR comment "
                           f"holds {PR_COMMENT_LIMIT})")  # fmt: skip
    diff.add_argument("--full-md", type=Path, help="also write the full markdown report (every group)")
    diff.add_argument("--json-out", type=Path, help="also write the full JSON report")
    diff.add_argument("--html", type=Path, help="also write a self-contained HTML report")
    diff.add_argument("--fail-on-narrowing", action="store_true", help="exit 1 on narrowings too")
    diff.add_argument("--quiet", action="store_true", help="no progress on stderr")
    diff.add_argument(
        "--cpu-out",
        type=Path,
        help="also write the CPU seconds of each part of the diff "
        "(reading, inputs, serialising, each side's OPA, decoding, comparing, report) as JSON",
    )
    diff.set_defaults(func=run_diff)

    bundle = sub.add_parser("bundle", help="build a signed OPA bundle of policies/")
    bundle.add_argument(
        "--policies", type=Path, default=DEFAULT_POLICIES, help="policy folder (default policies/)"
    )
    bundle.add_argument(
        "--signing-key", type=Path, required=True, help="PEM private key that signs the bundle"
    )
    bundle.add_argument("--verification-key", type=Path, help="check the signature after building")
    bundle.add_argument("--signing-alg", default="RS256", help="JWS algorithm (default RS256)")
    bundle.add_argument("--key-id", default="mcp-fhir-policy", help="key id OPA verifies with")
    bundle.add_argument("--revision", help="default: git short sha, -dirty when policies/ has changes")
    bundle.add_argument("-o", "--output", type=Path, required=True, help="bundle file to write (.tar.gz)")
    bundle.set_defaults(func=run_bundle)

    build = sub.add_parser("build", help="derive the policy's lookup tables from its YAML data")
    build.add_argument(
        "--policies", type=Path, default=DEFAULT_POLICIES, help="policy folder (default policies/)"
    )
    build.add_argument("--check", action="store_true", help="exit 1 when the checked-in tables are stale")
    build.set_defaults(func=run_build)

    cfg = sub.add_parser("opa-config", help="print an OPA config that downloads and verifies the bundle")
    cfg.add_argument("--verification-key", type=Path, required=True, help="PEM public key OPA verifies with")
    cfg.add_argument("--service-url", required=True, help="base URL the bundle is served from")
    cfg.add_argument("--resource", default="bundle.tar.gz", help="bundle path under the service URL")
    cfg.add_argument("--signing-alg", default="RS256", help="JWS algorithm (default RS256)")
    cfg.add_argument("--key-id", default="mcp-fhir-policy", help="key id OPA verifies with")
    cfg.set_defaults(func=run_opa_config)


def run_build(args: argparse.Namespace) -> int:
    from mcp_fhir.governance.build import run_build as build

    return build(args)


# -- test / lint ------------------------------------------------------------------------------


def run_test(args: argparse.Namespace) -> int:
    from mcp_fhir.governance.tooling import run_tests

    result = run_tests(args.policies, threshold=args.threshold)
    if args.json:
        print(json.dumps({"ok": result.ok, "passed": result.passed, "failed": result.failed,
                          "errors": result.errors, "fixtures_failed": result.fixtures_failed,
                          "coverage": result.coverage,
                          "threshold": result.threshold, "uncovered": result.uncovered}, indent=2))  # fmt: skip
    else:
        print(result.summary())
    return EXIT_OK if result.ok else EXIT_FAILED


def run_lint(args: argparse.Namespace) -> int:
    from mcp_fhir.governance.tooling import run_lint as lint

    result = lint(args.policies)
    print(result.summary())
    return EXIT_OK if result.ok else EXIT_FAILED


# -- eval -------------------------------------------------------------------------------------


def _claim(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError("policy.eval.claim", "must be KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _policy_config(policies: Path) -> dict[str, Any]:
    from mcp_fhir.governance.diff import BatchEvaluator

    return _config(BatchEvaluator(policies))


def _config(evaluator: Any) -> dict[str, Any]:
    value = evaluator.query("data.mcp_fhir.config")
    return value if isinstance(value, dict) else {}


def _input_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    from datetime import datetime

    from mcp_fhir.agent_auth.subject import Subject
    from mcp_fhir.catalog import CATALOGUE
    from mcp_fhir.governance.grid import role_claim_name
    from mcp_fhir.policy.input import decision_input

    if not args.tool:
        raise ConfigError("policy.eval", "give --input, --input-json, or --tool with flags")
    if args.tool not in CATALOGUE:
        raise ConfigError("policy.eval.tool", "not a tool of the catalogue: " + ", ".join(sorted(CATALOGUE)))
    operation, types = CATALOGUE[args.tool]
    claims: dict[str, Any] = dict(_claim(c) for c in args.claim)
    if args.role:
        claims[role_claim_name(_policy_config(args.policies))] = list(args.role)
    now = None
    if args.time:
        try:
            now = datetime.fromisoformat(args.time.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError("policy.eval.time", "must be an RFC 3339 instant") from exc
    return decision_input(
        subject=Subject(id=CLI_SUBJECT_ID, authn=args.authn, claims=claims, scopes=tuple(args.scope)),
        tool=args.tool,
        operation=operation,
        resource_type=args.resource_type or types[0],
        patient=args.patient,
        params={},
        purpose=args.purpose,
        break_glass_reason=args.break_glass,
        backend="default",
        request_id="policy-eval",
        now=now,
    )


def _eval_input(args: argparse.Namespace) -> dict[str, Any]:
    if args.input is not None and args.input_json is not None:
        raise ConfigError("policy.eval", "give --input or --input-json, not both")
    try:
        if args.input is not None:
            return dict(json.loads(args.input.read_text(encoding="utf-8")))
        if args.input_json is not None:
            return dict(json.loads(args.input_json))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ConfigError("policy.eval.input", "must be a JSON object") from exc
    return _input_from_flags(args)


def rule_title(path: Path, row: int) -> str | None:
    """The `# title:` of the METADATA block just above a rule, if the file is readable."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    i = row - 2
    while 0 <= i < len(lines) and lines[i].lstrip().startswith("#"):
        text = lines[i].strip().lstrip("#").strip()
        if text.startswith("title:"):
            return text.removeprefix("title:").strip()
        i -= 1
    return None


def run_eval(args: argparse.Namespace) -> int:
    from mcp_fhir.governance.tooling import explain

    decision_input = _eval_input(args)
    decision, fired = explain(args.policies, decision_input)
    if args.json:
        print(json.dumps({"input": decision_input, "decision": decision,
                          "fired": [{"rule": f.name, "file": f.file, "row": f.row, "times": f.times}
                                    for f in fired]}, indent=2))  # fmt: skip
        return EXIT_OK
    if decision is None:
        print("decision: UNDEFINED (the sidecar denies: opa_undefined)")
        return EXIT_OK
    print(f"decision: {'ALLOW' if decision.get('allow') else 'DENY'}")
    for r in decision.get("reasons") or []:
        print(f"  reason {r.get('code')}: {r.get('message')}")
    print("obligations:")
    for key, value in (decision.get("obligations") or {}).items():
        print(f"  {key}: {json.dumps(value)}")
    print(f"audit: {json.dumps(decision.get('audit'))}")
    denies = [f for f in fired if f.is_deny]
    print("deny rules whose bodies succeeded:" if denies else "deny rules whose bodies succeeded: none")
    for f in denies:
        title = rule_title(Path(f.file), f.row)
        print(f"  {f.file}:{f.row} {f.name}" + (f"  — {title}" if title else ""))
    shown = [f for f in fired if args.all_rules or not f.name.startswith("_")]
    hidden = len(fired) - len(shown)
    print(
        "rules that fired (file:line rule, xN when it fired N times)"
        + (f", {hidden} private helpers hidden (--all-rules):" if hidden else ":")
    )
    for f in shown:
        print(f"  {f.file}:{f.row} {f.name}" + (f" x{f.times}" if f.times > 1 else ""))
    return EXIT_OK


# -- diff -------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> bytes:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=DEFAULT_GIT_TIMEOUT,
                              check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError("policy.diff.repo", "git is not available") from exc
    if proc.returncode != 0:
        raise ConfigError(
            "policy.diff", "git failed: " + proc.stderr.decode("utf-8", "replace").strip()[:200]
        )
    return proc.stdout


def _dirty(repo: Path, policies_path: str) -> bool:
    status = _git(repo, "status", "--porcelain", "--untracked-files=all", "--", policies_path)
    return bool(status.strip())


@contextmanager
def policies_at(spec: str, *, repo: Path, policies_path: str, head: bool = False) -> Iterator[Path]:
    """A folder holding `policies/` as at `spec`: a folder as is, `WORKTREE` (the working tree's
    policies/), or a git ref extracted to a temp dir.

    For the head side, a ref that names the checked-out commit while `policies/` has uncommitted
    changes is refused: the diff would silently miss those edits.
    """
    if spec == WORKTREE:
        top = Path(_git(repo, "rev-parse", "--show-toplevel").decode().strip())
        folder = top / policies_path
        if not folder.is_dir():
            raise ConfigError("policy.diff", f"the working tree has no {policies_path} folder")
        yield folder
        return
    folder = Path(spec)
    if folder.is_dir():
        nested = folder / "policies"
        yield nested if nested.is_dir() and not any(folder.glob("*.rego")) else folder
        return
    commit = _git(repo, "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}").strip()
    if head and commit == _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}").strip():
        if _dirty(repo, policies_path):
            raise ConfigError(
                "policy.diff.head",
                f"{policies_path}/ has uncommitted changes that {spec} does not hold: commit them, or "
                f"diff against {WORKTREE} to include the working tree",
            )
    archive = _git(repo, "archive", "--format=tar", spec, "--", policies_path)
    with tempfile.TemporaryDirectory(prefix="mcp-fhir-policy-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp) / policies_path


def _progress(quiet: bool) -> Any:
    last: dict[str, float] = {}

    def report(side: str, done: int, total: int) -> None:
        now = time.monotonic()
        if quiet or (done < total and now - last.get(side, 0.0) < 1.0):
            return
        last[side] = now
        print(f"[policy diff] {side}: {done}/{total} decisions", file=sys.stderr, flush=True)

    return report


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_diff(args: argparse.Namespace) -> int:
    # A replay builds a few containers per record and frees none before the report: the cyclic
    # collector would walk them all again and again (two thirds of the CPU of reading a large
    # trail). Reference counting still frees everything; the collector resumes afterwards.
    with _cyclic_gc_paused():
        return _run_diff(args)


def _run_diff(args: argparse.Namespace) -> int:
    from mcp_fhir.audit.trail import load_cipher
    from mcp_fhir.governance.diff import (
        Approvals,
        BatchEvaluator,
        CpuMeter,
        approvals_changes,
        diff_cases,
        unique_cases,
    )
    from mcp_fhir.governance.grid import fixture_cases, grid_cases, replay_cases, role_claim_name
    from mcp_fhir.governance.report import to_html, to_json, to_markdown

    if not 1_000 <= args.max_chars <= PR_COMMENT_LIMIT:
        raise ConfigError("policy.diff.max_chars", f"must be from 1000 to {PR_COMMENT_LIMIT}")
    progress = _progress(args.quiet)
    meter = CpuMeter()
    with (
        policies_at(args.base, repo=args.repo, policies_path=args.policies_path) as base_dir,
        policies_at(args.head, repo=args.repo, policies_path=args.policies_path, head=True) as head_dir,
    ):
        base = BatchEvaluator(base_dir, name="base", meter=meter)
        head = BatchEvaluator(head_dir, name="head", meter=meter)
        configs = [_config(head), _config(base)]
        cases = []
        cipher = load_cipher(key_env=args.encryption_key_env, key_file=args.encryption_key_file, key_id=None,
                             section="policy.diff")  # fmt: skip
        with meter.part("read"):
            for trail in args.replay:
                cases += replay_cases(trail, cipher)
        with meter.part("inputs"):
            if not args.no_fixtures:
                cases += fixture_cases([head_dir / "fixtures", base_dir / "fixtures"])
            if not args.no_grid:
                cases += grid_cases(configs, full=args.full_grid)
            cases = unique_cases(cases)
        if not cases:
            raise ConfigError("policy.diff", "no decision inputs to replay")
        if not args.quiet:
            print(f"[policy diff] replaying {len(cases)} inputs", file=sys.stderr, flush=True)
        # Approvals come from the base (the protected branch): a change cannot approve itself.
        if args.approvals is not None and not args.approvals.is_file():
            raise ConfigError("policy.diff.approvals", "no such file")
        approvals_file = args.approvals or base_dir / "approvals.yaml"
        approvals = Approvals.load(approvals_file)
        changed_approvals = approvals_changes(base_dir / "approvals.yaml", head_dir / "approvals.yaml")
        report = diff_cases(
            cases, base, head, base_label=args.base, head_label=args.head, approvals=approvals,
            approvals_changes=changed_approvals,
            approvals_source=str(args.approvals) if args.approvals else f"{args.base}: approvals.yaml",
            role_claim=role_claim_name(configs[0]), progress=progress, meter=meter,
        )  # fmt: skip
    with meter.part("report"):
        if args.format == "md":
            text = to_markdown(report, max_chars=args.max_chars)
        else:
            text = json.dumps(to_json(report), indent=2, default=str)
        if args.out:
            _write(args.out, text)
        else:
            sys.stdout.write(text)
        if args.full_md:
            _write(args.full_md, to_markdown(report, max_chars=None))
        if args.json_out:
            _write(args.json_out, json.dumps(to_json(report), indent=2, default=str))
        if args.html:
            _write(args.html, to_html(report))
    if args.cpu_out:
        cpu = {k: round(v, 3) for k, v in meter.summary().items()}
        _write(args.cpu_out, json.dumps({"cpu_s": cpu, "counts": meter.counts}, indent=2))
    if not args.quiet:
        print(f"[policy diff] {report.count('widening')} widening, {report.count('narrowing')} narrowing, "
              f"{report.count('changed')} changed; {report.unapproved_widenings} unapproved; "
              f"{len(report.approvals_needing_review)} approvals change(s) to review "
              f"({report.seconds:.1f}s, {report.evaluated / max(report.seconds, 1e-9):.0f} inputs/s)",
              file=sys.stderr)  # fmt: skip
    if not report.ok or (args.fail_on_narrowing and report.count("narrowing")):
        return EXIT_FAILED
    return EXIT_OK


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# -- bundle -----------------------------------------------------------------------------------


def run_bundle(args: argparse.Namespace) -> int:
    from mcp_fhir._exceptions import PolicyUnavailable
    from mcp_fhir.governance.bundle import BundleSettings, build_bundle

    settings = BundleSettings(
        policies=args.policies, output=args.output, signing_key=args.signing_key,
        verification_key=args.verification_key, signing_alg=args.signing_alg, key_id=args.key_id,
        revision=args.revision,
    )  # fmt: skip
    try:
        revision = build_bundle(settings)
    except PolicyUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    verified = " (signature verified)" if args.verification_key else ""
    print(f"ok: {args.output} revision {revision}, signed {args.signing_alg} key id {args.key_id}{verified}")
    return EXIT_OK


def run_opa_config(args: argparse.Namespace) -> int:
    from mcp_fhir.governance.bundle import bundle_config

    if not args.verification_key.is_file():
        raise ConfigError("policy.opa_config.verification_key", "must be a PEM file")
    cfg = bundle_config(
        service_url=args.service_url, resource=args.resource,
        public_key_pem=args.verification_key.read_text(encoding="utf-8"), key_id=args.key_id,
        alg=args.signing_alg,
    )  # fmt: skip
    sys.stdout.write(yaml.safe_dump(cfg, sort_keys=False))
    return EXIT_OK
