"""Policy diff: replay decision inputs against two versions of `policies/` and classify what changed.

    sources (grid, fixtures, audit replay) ──▶ BatchEvaluator(base) ─┐
                                           └─▶ BatchEvaluator(head) ─┴─▶ classify ─▶ DiffReport

Each distinct decision input is evaluated once per side (`decision_key`: inputs equal but for the
request id, which the decision does not depend on, share one evaluation; every record is still
counted and reported on its own). Both sides are evaluated by the real OPA in batch: one `opa eval`
per chunk of 2,000 distinct inputs, fed on stdin as one JSON document of the inputs' own bytes,
with a wrapper query (`{i: d | some i, x in input.cases; d := decision with input as x}`) that
decides every input of the chunk in one process, compact output (`--format raw`), and the Go
garbage collector relaxed (`GOGC=400`: a short-lived process whose heap the chunk bounds). The
answer is split per input without being decoded (msgspec `Raw`): a pair of decisions whose JSON is
the same is no change, and only a pair that differs is decoded and classified, once per distinct
pair. Chunks of both sides run in parallel, a bounded window ahead of the classifier, so a trail of
any length is replayed in bounded memory. What is left per input is OPA's own evaluation of the
policy (see the Replay section of docs/performance.md; `CpuMeter` says where the CPU goes, and
`policy diff --cpu-out` writes it). A change is a *widening* when the head
grants more than the base did (deny→allow, fewer excluded labels, more categories, a removed
redaction, a longer lookback, a higher max_results), a *narrowing* when it grants less, and
*changed* otherwise (different deny reasons, different audit alerts). Widenings must be approved
in the BASE side's `policies/approvals.yaml` (see `Approvals`), or the diff fails: a pull request
cannot approve its own widening, and a change to `approvals.yaml` itself (an approval added or
edited, or a file that no longer parses) is reported by `approvals_changes` as a widening that
needs review. Changes whose access is the same (*changed*) are grouped by what changed, not by
role, tool and purpose, so that a new reason code on many denies is one row, not hundreds.

Python never decides here either: it compares two decisions OPA made. Role, tool and purpose
are read from the input only to group the report.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import msgspec
import yaml

from mcp_fhir._exceptions import ConfigError, PolicyUnavailable
from mcp_fhir.policy.managed_opa import find_opa

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_EVAL_TIMEOUT",
    "DEFAULT_EXAMPLES_PER_GROUP",
    "Approval",
    "ApprovalChange",
    "Approvals",
    "BatchEvaluator",
    "Case",
    "Change",
    "CpuMeter",
    "DiffReport",
    "Group",
    "approvals_changes",
    "classify",
    "decision_key",
    "decode_decision",
    "diff_cases",
    "encode_input",
    "evaluate_pairs",
]

DEFAULT_CHUNK_SIZE = 2_000  # inputs per `opa eval` process: compile once per 2,000 decisions
OPA_GOGC = "400"  # the Go GC runs a quarter as often: 25-30 % less CPU per decision in `opa eval`
DEFAULT_EVAL_TIMEOUT = 300.0  # seconds for one chunk
DEFAULT_EXAMPLES_PER_GROUP = 3
DECISION_QUERY = "data.mcp_fhir.authz.decision"
UNBOUNDED = float("inf")
# Files in a policies/ folder that are not policy: never loaded into OPA by the diff or bundle.
NON_POLICY_FILES = ("approvals.yaml",)

WIDENING_KINDS = frozenset({
    "deny_to_allow", "fewer_excluded_labels", "category_restriction_lifted", "more_categories",
    "removed_redaction", "longer_lookback", "higher_max_results",
})  # fmt: skip
NARROWING_KINDS = frozenset({
    "allow_to_deny", "more_excluded_labels", "category_restriction_added", "fewer_categories",
    "added_redaction", "shorter_lookback", "lower_max_results",
})  # fmt: skip

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class Case:
    """One decision input to replay, and where it came from (`grid`, `fixture`, `replay`)."""

    source: str
    label: str
    input: Mapping[str, Any]


class CpuMeter:
    """CPU seconds (user + sys) by part of a diff: Python parts per thread, OPA children per side.

    A Python part is timed with the CPU clock of the thread that runs it (`time.thread_time`), so
    parts running at once in the evaluation threads are each counted once; an `opa` child's CPU is
    its own rusage, read when it is reaped (`opa_base`, `opa_head`). `summary()` adds `other`: the
    rest of this process's CPU since the meter began (start-up, thread hand-offs, the report).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.parts: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._began = _own_cpu()

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            self.parts[part] = self.parts.get(part, 0.0) + seconds

    def count(self, name: str, n: int) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        began = time.thread_time()
        try:
            yield
        finally:
            self.add(name, time.thread_time() - began)

    def summary(self) -> dict[str, float]:
        """CPU seconds of each part, `other`, and `total` (this process and every OPA child)."""
        with self._lock:
            parts = dict(self.parts)
        python = sum(v for k, v in parts.items() if not k.startswith("opa_"))
        parts["other"] = max(0.0, _own_cpu() - self._began - python)
        parts["total"] = sum(parts.values())
        return parts


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _enc_hook(obj: Any) -> Any:
    return dict(obj) if isinstance(obj, Mapping) else str(obj)


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)
_SORTED_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook, order="sorted")
_DECISION_MAP = msgspec.json.Decoder(dict[str, msgspec.Raw])
_NULL = b"null"


def encode_input(inp: Mapping[str, Any]) -> bytes:
    """Compact JSON of one decision input, as OPA reads it."""
    return _ENCODER.encode(inp)


def decision_key(inp: Mapping[str, Any]) -> bytes:
    """Inputs with equal keys get equal decisions: the canonical JSON (keys sorted) of the input
    without the one field that is unique to each call and that the decision does not depend on, the
    request id (`context.request_id`) when it is a string. Its presence and type are kept in the key
    (a policy may check them: a well-formed input has a string or null there). Time, patient and
    everything else stay: only inputs byte-identical but for the request id share a decision.
    """
    context = inp.get("context")
    if isinstance(context, Mapping) and isinstance(context.get("request_id"), str):
        rest = {k: v for k, v in context.items() if k != "request_id"}
        return b"s" + _SORTED_ENCODER.encode({**inp, "context": rest})
    return b"=" + _SORTED_ENCODER.encode(inp)


def decode_decision(raw: bytes | None) -> Any:
    """A decision's JSON (from `decide_raw`) as Python values; None when undefined."""
    return None if raw is None else msgspec.json.decode(raw)


class BatchEvaluator:
    """`data.mcp_fhir.authz.decision` for many inputs, by the real OPA over one policies/ folder."""

    def __init__(
        self,
        policies: Path,
        *,
        binary: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        workers: int | None = None,
        timeout: float = DEFAULT_EVAL_TIMEOUT,
        name: str = "opa",
        meter: CpuMeter | None = None,
    ) -> None:
        if not policies.is_dir():
            raise ConfigError("policy.diff", f"not a policies folder: {policies.name}")
        if chunk_size < 1:
            raise ConfigError("policy.diff.chunk_size", "must be at least 1")
        self.policies = policies
        self.binary = find_opa(binary)
        self.chunk_size = chunk_size
        # Both sides run at once: half the cores each.
        self.workers = workers or max(1, (os.cpu_count() or 2) // 2)
        self.timeout = timeout
        self.name = name
        self.meter = meter or CpuMeter()

    def _command(self, input_file: Path | None, query: str, fmt: str = "json") -> list[str]:
        # the read-optimised store, as the sidecar's OPA runs: data read as Rego values, not converted per input
        cmd = [self.binary, "eval", "--optimize-store-for-read-speed", "--format", fmt, "-d", str(self.policies)]
        cmd += ["-i", str(input_file)] if input_file is not None else ["--stdin-input"]
        for name in NON_POLICY_FILES:
            cmd += ["--ignore", name]
        return [*cmd, query]

    def query(self, query: str) -> Any:
        """The value of one query with no input (e.g. `data.mcp_fhir.config`); None when undefined."""
        return _first_value(_loads(self._exec(self._command(None, query), b"{}")))

    def _run(self, cmd: list[str]) -> Any:
        return _loads(self._exec(cmd, b""))

    def _exec(self, cmd: list[str], stdin: bytes) -> bytes:
        """stdout of one `opa` run fed `stdin`; its CPU (rusage at reaping) goes to `opa_<name>`."""
        env = {**os.environ, "GOGC": os.environ.get("MCP_FHIR_OPA_GOGC", OPA_GOGC)}
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                proc.kill()

            timer = threading.Timer(self.timeout, expire)
            timer.start()
            try:
                to_opa, from_opa = proc.stdin, proc.stdout
                if to_opa is None or from_opa is None:  # never: both are pipes
                    raise PolicyUnavailable("opa eval could not be started")
                try:
                    to_opa.write(stdin)
                    to_opa.close()
                except BrokenPipeError:
                    pass  # opa stopped before reading its input: its exit code and stderr say why
                out = from_opa.read()
                from_opa.close()
            finally:
                timer.cancel()
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                self.meter.add(f"opa_{self.name}", usage.ru_utime + usage.ru_stime)
                self.meter.count(f"opa_{self.name}_runs", 1)
            if expired.is_set():
                raise PolicyUnavailable("opa eval did not finish in time")
            if proc.returncode != 0:
                err.seek(0)
                detail = err.read().decode("utf-8", "replace").strip().splitlines()[:3]
                raise PolicyUnavailable("opa eval failed: " + " | ".join(detail))
        return out

    def decide_raw(self, payloads: Sequence[bytes]) -> list[bytes | None]:
        """One decision's compact JSON (None when undefined) per encoded input, in order, from one
        `opa eval` whose input (`{"cases": [...]}`) is written to its stdin as is."""
        if not payloads:
            return []
        query = f"{{i: d | some i, x in input.cases; d := {DECISION_QUERY} with input as x}}"
        with self.meter.part("serialise"):
            document = b'{"cases":[' + b",".join(payloads) + b"]}"
        # raw: the compact JSON of the value only
        out = self._exec(self._command(None, query, fmt="raw"), document)
        with self.meter.part("decode"):
            try:
                value = _DECISION_MAP.decode(out)
            except msgspec.ValidationError as exc:
                raise PolicyUnavailable(
                    "opa eval answered with something that is not a decision map"
                ) from exc
            except msgspec.DecodeError as exc:
                raise PolicyUnavailable("opa eval answered with something that is not JSON") from exc
            # Keys come back as strings; a missing key is an undefined decision (a deny, fail closed).
            decisions: list[bytes | None] = []
            for i in range(len(payloads)):
                raw = value.get(str(i))
                decisions.append(None if raw is None or raw == _NULL else bytes(raw))
        return decisions

    def decide_chunk(self, inputs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any] | None]:
        """One decision (or None when undefined) per input, in order, from one `opa eval`."""
        with self.meter.part("serialise"):
            payloads = [encode_input(x) for x in inputs]
        raws = self.decide_raw(payloads)
        with self.meter.part("decode"):
            return [decode_decision(r) for r in raws]

    def chunks(self, inputs: Sequence[Mapping[str, Any]]) -> list[Sequence[Mapping[str, Any]]]:
        return [inputs[i : i + self.chunk_size] for i in range(0, len(inputs), self.chunk_size)]

    def evaluate(
        self, inputs: Sequence[Mapping[str, Any]], progress: Callable[[int], None] | None = None
    ) -> list[dict[str, Any] | None]:
        """One decision (or None when undefined) per input, in order."""
        out: list[dict[str, Any] | None] = []
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for result in pool.map(self.decide_chunk, self.chunks(inputs)):
                out.extend(result)
                if progress is not None:
                    progress(len(out))
        return out


def _loads(out: bytes) -> Any:
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise PolicyUnavailable("opa eval answered with something that is not JSON") from exc


def evaluate_pairs(
    inputs: Sequence[Mapping[str, Any]],
    base: BatchEvaluator,
    head: BatchEvaluator,
    progress: Progress | None = None,
) -> Iterator[tuple[int, list[dict[str, Any] | None], list[dict[str, Any] | None]]]:
    """(offset, base decisions, head decisions) chunk by chunk, in order.

    Both sides' chunks run at once on one pool (each side's `workers`), at most a window of chunks
    ahead of the consumer: memory stays bounded by the window, not by the length of the trail.
    """
    b_chunks = base.chunks(inputs)  # both sides decide the same chunks
    workers = base.workers + head.workers
    window = 2 * workers
    total = len(inputs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[int, Future[Any], Future[Any]]] = deque()
        offset = 0
        next_chunk = 0
        done = 0
        while next_chunk < len(b_chunks) or pending:
            while next_chunk < len(b_chunks) and len(pending) < window:
                chunk = b_chunks[next_chunk]
                pending.append(
                    (
                        offset,
                        pool.submit(base.decide_chunk, chunk),
                        pool.submit(head.decide_chunk, chunk),
                    )
                )
                offset += len(chunk)
                next_chunk += 1
            start, b_future, h_future = pending.popleft()
            b_results, h_results = b_future.result(), h_future.result()
            done += len(b_results)
            if progress is not None:
                progress("base", done, total)
                progress("head", done, total)
            yield start, b_results, h_results


def _first_value(body: Any) -> Any:
    try:
        return body["result"][0]["expressions"][0]["value"]
    except (KeyError, IndexError, TypeError):
        return None


# -- classification ---------------------------------------------------------------------------


def _as_decision(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    if raw is None:
        return {"allow": False, "reasons": [{"code": "opa_undefined"}], "obligations": {}, "audit": {}}
    return dict(raw)


def _codes(d: Mapping[str, Any]) -> list[str]:
    return sorted(str(r.get("code")) for r in d.get("reasons") or [] if isinstance(r, Mapping))


def _limit(value: Any) -> float:
    return UNBOUNDED if value is None else float(value)


def _obligation_facets(base: Mapping[str, Any], head: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(kind, detail) for each way the head's obligations differ from the base's."""
    facets: list[tuple[str, str]] = []
    b_labels = set(base.get("exclude_security_labels") or [])
    h_labels = set(head.get("exclude_security_labels") or [])
    if b_labels - h_labels:
        facets.append(("fewer_excluded_labels", "released " + ", ".join(sorted(b_labels - h_labels))))
    if h_labels - b_labels:
        facets.append(("more_excluded_labels", "withheld " + ", ".join(sorted(h_labels - b_labels))))
    b_cats: Mapping[str, Any] = base.get("allowed_categories") or {}
    h_cats: Mapping[str, Any] = head.get("allowed_categories") or {}
    for rtype in sorted(set(b_cats) | set(h_cats)):
        if rtype not in h_cats:
            facets.append(("category_restriction_lifted", f"{rtype}: any category"))
        elif rtype not in b_cats:
            facets.append(("category_restriction_added", f"{rtype}: only {', '.join(sorted(h_cats[rtype]))}"))
        else:
            more = set(h_cats[rtype]) - set(b_cats[rtype])
            fewer = set(b_cats[rtype]) - set(h_cats[rtype])
            if more:
                facets.append(("more_categories", f"{rtype}: +{', '.join(sorted(more))}"))
            if fewer:
                facets.append(("fewer_categories", f"{rtype}: -{', '.join(sorted(fewer))}"))
    b_red, h_red = set(base.get("redact") or []), set(head.get("redact") or [])
    if b_red - h_red:
        facets.append(("removed_redaction", ", ".join(sorted(b_red - h_red))))
    if h_red - b_red:
        facets.append(("added_redaction", ", ".join(sorted(h_red - b_red))))
    for key, up, down in (
        ("max_lookback_days", "longer_lookback", "shorter_lookback"),
        ("max_results", "higher_max_results", "lower_max_results"),
    ):
        b, h = _limit(base.get(key)), _limit(head.get(key))
        if h != b:
            facets.append((up if h > b else down, f"{base.get(key)} → {head.get(key)}"))
    return facets


@dataclass(frozen=True, slots=True)
class Change:
    """One input whose decision changed: its class, each facet of the change, and both decisions."""

    case: Case
    classification: str  # widening | narrowing | changed
    facets: tuple[tuple[str, str], ...]
    base: Mapping[str, Any]
    head: Mapping[str, Any]
    role: str
    tool: str
    purpose: str
    reason: str

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.facets)

    @property
    def widening_kinds(self) -> frozenset[str]:
        return frozenset(self.kinds) & WIDENING_KINDS


def classify(
    base_raw: Mapping[str, Any] | None, head_raw: Mapping[str, Any] | None
) -> tuple[str, list[tuple[str, str]]] | None:
    """None when the decisions agree; else (classification, facets)."""
    base, head = _as_decision(base_raw), _as_decision(head_raw)
    facets: list[tuple[str, str]] = []
    b_allow, h_allow = base.get("allow") is True, head.get("allow") is True
    if not b_allow and h_allow:
        facets.append(("deny_to_allow", "was denied: " + ", ".join(_codes(base))))
    elif b_allow and not h_allow:
        facets.append(("allow_to_deny", "now denied: " + ", ".join(_codes(head))))
    elif b_allow and h_allow:
        facets += _obligation_facets(base.get("obligations") or {}, head.get("obligations") or {})
    elif _codes(base) != _codes(head):
        facets.append(("deny_reasons_changed", f"{', '.join(_codes(base))} → {', '.join(_codes(head))}"))
    if (base.get("audit") or {}) != (head.get("audit") or {}):
        b_audit, h_audit = base.get("audit") or {}, head.get("audit") or {}
        facets.append(
            (
                "audit_changed",
                f"{json.dumps(b_audit, sort_keys=True)} → {json.dumps(h_audit, sort_keys=True)}",
            )
        )
    if not facets:
        return None
    kinds = {k for k, _ in facets}
    if kinds & WIDENING_KINDS:
        return "widening", facets
    if kinds & NARROWING_KINDS:
        return "narrowing", facets
    return "changed", facets


# -- approvals --------------------------------------------------------------------------------

APPROVAL_FIELDS = ("role", "tool", "purpose", "kind")


@dataclass(frozen=True, slots=True)
class Approval:
    """One reviewed widening: which role/tool/purpose/kind (or `*`), who approved it, under which ticket."""

    id: str
    role: str
    tool: str
    purpose: str
    kind: str
    reviewer: str
    ticket: str
    expires: date | None = None
    note: str = ""

    def active(self, today: date) -> bool:
        return self.expires is None or today <= self.expires

    def covers(self, change: Change, today: date) -> bool:
        if not self.active(today):
            return False
        for name, value in (("role", change.role), ("tool", change.tool), ("purpose", change.purpose)):
            wanted = getattr(self, name)
            if wanted != "*" and wanted != value:
                return False
        return self.kind == "*" or change.widening_kinds <= {self.kind}


@dataclass(frozen=True, slots=True)
class Approvals:
    """The reviewed `policies/approvals.yaml`. Schema:

    approvals:
      - id: APR-0001
        role: nurse                 # or "*"
        tool: search_medication_statements   # or "*"
        purpose: treatment          # or "*"; "(none)" for calls without a purpose
        kind: deny_to_allow         # a widening kind, or "*"
        reviewer: a.security@example.org
        ticket: SEC-123
        expires: 2027-01-31         # optional; an expired approval approves nothing
        note: why this is fine      # optional
    """

    entries: tuple[Approval, ...] = ()

    @classmethod
    def load(cls, path: Path | None) -> Approvals:
        if path is None or not path.exists():
            return cls()
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("approvals", "not valid YAML") from exc
        return cls.from_mapping(raw)

    @classmethod
    def from_mapping(cls, raw: Any) -> Approvals:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("approvals", []), list):
            raise ConfigError("approvals", "must be a mapping with an `approvals` list")
        entries = []
        seen: set[str] = set()
        for i, item in enumerate(raw.get("approvals") or []):
            key = f"approvals[{i}]"
            if not isinstance(item, Mapping):
                raise ConfigError(key, "must be a mapping")
            for name in ("id", *APPROVAL_FIELDS, "reviewer", "ticket"):
                if not isinstance(item.get(name), str) or not item[name].strip():
                    raise ConfigError(f"{key}.{name}", "required, a non-empty string")
            if item["kind"] != "*" and item["kind"] not in WIDENING_KINDS:
                raise ConfigError(
                    f"{key}.kind", "must be a widening kind or *: " + ", ".join(sorted(WIDENING_KINDS))
                )
            if item["id"] in seen:
                raise ConfigError(f"{key}.id", "duplicate approval id")
            seen.add(item["id"])
            expires = item.get("expires")
            if expires is not None and not isinstance(expires, date):
                try:
                    expires = date.fromisoformat(str(expires))
                except ValueError as exc:
                    raise ConfigError(f"{key}.expires", "must be a date (YYYY-MM-DD)") from exc
            entries.append(
                Approval(
                    id=item["id"], role=item["role"], tool=item["tool"], purpose=item["purpose"],
                    kind=item["kind"], reviewer=item["reviewer"], ticket=item["ticket"], expires=expires,
                    note=str(item.get("note") or ""),
                )
            )  # fmt: skip
        return cls(tuple(entries))

    def approving(self, change: Change, today: date) -> Approval | None:
        return next((a for a in self.entries if a.covers(change, today)), None)


@dataclass(frozen=True, slots=True)
class ApprovalChange:
    """How the head's `approvals.yaml` differs from the base's, one approval (or the file) at a time.

    `added`, `modified` and `invalid` widen what is approved: they need review (they fail the diff).
    `removed` narrows it and is only reported.
    """

    kind: str  # added | modified | removed | invalid
    id: str
    detail: str = ""

    @property
    def needs_review(self) -> bool:
        return self.kind != "removed"


def _approvals_text(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return path.read_text(encoding="utf-8")


def _parse_approvals(text: str | None) -> Approvals:
    if text is None:
        return Approvals()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("approvals", "not valid YAML") from exc
    return Approvals.from_mapping(raw)


def approvals_changes(base_file: Path | None, head_file: Path | None) -> list[ApprovalChange]:
    """Every approval the head adds, edits or removes relative to the base (comments are ignored)."""
    base = _parse_approvals(_approvals_text(base_file))
    try:
        head = _parse_approvals(_approvals_text(head_file))
    except ConfigError as exc:
        return [ApprovalChange("invalid", "approvals.yaml", f"{exc.key}: {exc.rule}")]
    before = {a.id: a for a in base.entries}
    after = {a.id: a for a in head.entries}
    out = []
    for key in sorted(set(before) | set(after)):
        if key not in before:
            a = after[key]
            out.append(
                ApprovalChange("added", key, f"{a.role}/{a.tool}/{a.purpose}/{a.kind} by {a.reviewer}")
            )
        elif key not in after:
            out.append(ApprovalChange("removed", key))
        elif before[key] != after[key]:
            fields = [n for n in Approval.__slots__ if getattr(before[key], n) != getattr(after[key], n)]
            out.append(ApprovalChange("modified", key, "changed " + ", ".join(fields)))
    return out


# -- the report -------------------------------------------------------------------------------


VARIOUS = "*"  # a `changed` group spans several roles, tools or purposes: see `roles`, `tools`, `purposes`


@dataclass
class Group:
    """Changes that share a class, role, tool, purpose and reason code.

    `reason` is the deny reason code(s) behind the change: for a widening, the codes the base denied
    with (which the head no longer gives); for a narrowing, the codes the head now denies with; for a
    `changed` group, `base codes → head codes`; `-` when both sides allow (only obligations or audit
    differ). `changed` groups (same access, other reasons or audit) are keyed by their kinds and
    reason only: role, tool and purpose are `*` there, and `roles`, `tools`, `purposes` list them.
    """

    classification: str
    role: str
    tool: str
    purpose: str
    reason: str
    kinds: set[str] = field(default_factory=set)
    count: int = 0
    examples: list[Change] = field(default_factory=list)
    approved_by: set[str] = field(default_factory=set)
    unapproved: int = 0
    roles: set[str] = field(default_factory=set)
    tools: set[str] = field(default_factory=set)
    purposes: set[str] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.classification, self.role, self.tool, self.purpose, self.reason)


@dataclass
class DiffReport:
    """Everything the renderers in `mcp_fhir.governance.report` need."""

    base_label: str
    head_label: str
    evaluated: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    unapproved_widenings: int = 0
    expired_approvals: list[str] = field(default_factory=list)
    approvals_changes: list[ApprovalChange] = field(default_factory=list)
    approvals_source: str = ""
    seconds: float = 0.0

    def count(self, classification: str) -> int:
        return sum(1 for c in self.changes if c.classification == classification)

    @property
    def approvals_needing_review(self) -> list[ApprovalChange]:
        return [c for c in self.approvals_changes if c.needs_review]

    @property
    def ok(self) -> bool:
        return self.unapproved_widenings == 0 and not self.approvals_needing_review


def _role_of(inp: Mapping[str, Any], role_claim: str) -> str:
    claims = (inp.get("subject") or {}).get("claims") or {}
    value = claims.get(role_claim) if isinstance(claims, Mapping) else None
    if isinstance(value, list):
        return ",".join(sorted(str(v) for v in value)) or "(none)"
    return str(value) if value else "(none)"


def _group_reason(classification: str, base: Mapping[str, Any], head: Mapping[str, Any]) -> str:
    if not base.get("allow") and head.get("allow"):
        return ",".join(_codes(base)) or "-"
    if classification == "changed" and not base.get("allow") and not head.get("allow"):
        before, after = ",".join(_codes(base)) or "-", ",".join(_codes(head)) or "-"
        return before if before == after else f"{before} → {after}"
    if not head.get("allow"):
        return ",".join(_codes(head)) or "-"
    return "-"


def diff_cases(
    cases: Sequence[Case],
    base: BatchEvaluator,
    head: BatchEvaluator,
    *,
    base_label: str,
    head_label: str,
    approvals: Approvals | None = None,
    approvals_changes: Sequence[ApprovalChange] = (),
    approvals_source: str = "",
    role_claim: str = "roles",
    today: date | None = None,
    examples_per_group: int = DEFAULT_EXAMPLES_PER_GROUP,
    progress: Progress | None = None,
    meter: CpuMeter | None = None,
) -> DiffReport:
    """Evaluate every case on both sides and report each decision that changed.

    Each distinct decision input (`decision_key`: equal but for the request id) is evaluated once
    per side, and its two decisions are compared as OPA's JSON: only a pair that differs is decoded
    and classified (once per distinct pair). Every case is still counted and reported on its own.

    `approvals` must come from the base (the protected branch), never from the change under review;
    `approvals_changes` (from `approvals_changes(base_file, head_file)`) are carried into the report.
    """
    started = datetime.now(UTC)
    today = today or started.date()
    meter = meter or getattr(base, "meter", None) or CpuMeter()
    report = DiffReport(
        base_label=base_label, head_label=head_label, evaluated=len(cases),
        approvals_changes=list(approvals_changes), approvals_source=approvals_source,
    )  # fmt: skip
    for c in cases:
        report.by_source[c.source] = report.by_source.get(c.source, 0) + 1
    with meter.part("inputs"):
        slots, representatives, payloads = _distinct(cases)
    meter.count("records", len(cases))
    meter.count("distinct", len(payloads))
    groups: dict[tuple[str, ...], Group] = {}
    verdicts: dict[tuple[bytes | None, bytes | None], _Verdict | None] = {}
    differing: dict[int, tuple[bytes | None, bytes | None]] = {}
    total, n = len(cases), 0
    for offset, b_raws, h_raws in _raw_pairs(representatives, payloads, base, head):
        with meter.part("compare"):
            for j, pair in enumerate(zip(b_raws, h_raws, strict=True)):
                if pair[0] != pair[1]:
                    differing[offset + j] = pair
            decided = offset + len(b_raws)
            while n < total and slots[n] < decided:  # every case whose input is decided by now
                changed = differing.get(slots[n])
                if changed is not None:
                    if changed not in verdicts:
                        verdicts[changed] = _verdict(*changed)
                    verdict = verdicts[changed]
                    if verdict is not None:
                        _add_change(report, groups, cases[n], verdict, role_claim, approvals, today,
                                    examples_per_group)  # fmt: skip
                n += 1
        if progress is not None:
            progress("base", n, total)
            progress("head", n, total)
    order = {"widening": 0, "narrowing": 1, "changed": 2}
    report.groups = sorted(
        groups.values(), key=lambda g: (order[g.classification], g.unapproved == 0, -g.count, g.key)
    )
    report.expired_approvals = [a.id for a in (approvals.entries if approvals else ()) if not a.active(today)]
    report.seconds = (datetime.now(UTC) - started).total_seconds()
    return report


@dataclass(frozen=True, slots=True)
class _Verdict:
    """How one pair of decisions differs: what `Change` holds besides the case and its names."""

    classification: str
    facets: tuple[tuple[str, str], ...]
    base: Mapping[str, Any]
    head: Mapping[str, Any]
    reason: str


def _verdict(b_raw: bytes | None, h_raw: bytes | None) -> _Verdict | None:
    b_decision, h_decision = decode_decision(b_raw), decode_decision(h_raw)
    verdict = classify(b_decision, h_decision)
    if verdict is None:
        return None
    classification, facets = verdict
    b, h = _as_decision(b_decision), _as_decision(h_decision)
    return _Verdict(classification, tuple(facets), b, h, _group_reason(classification, b, h))


def _add_change(
    report: DiffReport,
    groups: dict[tuple[str, ...], Group],
    case: Case,
    verdict: _Verdict,
    role_claim: str,
    approvals: Approvals | None,
    today: date,
    examples_per_group: int,
) -> None:
    classification = verdict.classification
    action = case.input.get("action") or {}
    context = case.input.get("context") or {}
    change = Change(
        case=case, classification=classification, facets=verdict.facets, base=verdict.base,
        head=verdict.head, role=_role_of(case.input, role_claim), tool=str(action.get("tool") or "(none)"),
        purpose=str(context.get("purpose") or "(none)"), reason=verdict.reason,
    )  # fmt: skip
    report.changes.append(change)
    if classification == "changed":
        names = (classification, VARIOUS, VARIOUS, VARIOUS, change.reason)
        key: tuple[str, ...] = (*names, *sorted(set(change.kinds)))
    else:
        names = (classification, change.role, change.tool, change.purpose, change.reason)
        key = names
    group = groups.setdefault(key, Group(*names))
    group.count += 1
    group.kinds.update(change.kinds)
    group.roles.add(change.role)
    group.tools.add(change.tool)
    group.purposes.add(change.purpose)
    if len(group.examples) < examples_per_group:
        group.examples.append(change)
    if classification == "widening":
        approval = approvals.approving(change, today) if approvals else None
        if approval is None:
            group.unapproved += 1
            report.unapproved_widenings += 1
        else:
            group.approved_by.add(f"{approval.id} ({approval.reviewer}, {approval.ticket})")


def _distinct(cases: Sequence[Case]) -> tuple[list[int], list[Mapping[str, Any]], list[bytes]]:
    """For each case the index of its distinct input (numbered in order of first appearance), and
    each distinct input (its first case's) with its JSON."""
    index: dict[bytes, int] = {}
    slots: list[int] = []
    representatives: list[Mapping[str, Any]] = []
    payloads: list[bytes] = []
    for case in cases:
        key = decision_key(case.input)
        slot = index.get(key)
        if slot is None:
            slot = index[key] = len(payloads)
            representatives.append(case.input)
            payloads.append(key[1:] if key[:1] == b"=" else encode_input(case.input))
        slots.append(slot)
    return slots, representatives, payloads


def _side_raw(
    side: Any, inputs: Sequence[Mapping[str, Any]], payloads: Sequence[bytes]
) -> list[bytes | None]:
    decide_raw = getattr(side, "decide_raw", None)
    if decide_raw is not None:
        return list(decide_raw(payloads))
    # any evaluator with `decide_chunk` (a test's stand-in): its decisions, as JSON to compare
    return [None if d is None else encode_input(d) for d in side.decide_chunk(inputs)]


def _raw_pairs(
    inputs: Sequence[Mapping[str, Any]],
    payloads: Sequence[bytes],
    base: BatchEvaluator,
    head: BatchEvaluator,
) -> Iterator[tuple[int, list[bytes | None], list[bytes | None]]]:
    """(offset, base decisions' JSON, head decisions' JSON) chunk by chunk, in order.

    Both sides' chunks run at once on one pool (each side's `workers`), at most a window of chunks
    ahead of the consumer: memory stays bounded by the window, not by the length of the trail.
    """
    size = base.chunk_size
    workers = base.workers + head.workers
    window = 2 * workers
    starts = range(0, len(payloads), size)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[int, Future[list[bytes | None]], Future[list[bytes | None]]]] = deque()
        queued = iter(starts)
        for start in queued:
            part = (inputs[start : start + size], payloads[start : start + size])
            pending.append((start, pool.submit(_side_raw, base, *part), pool.submit(_side_raw, head, *part)))
            if len(pending) < window:
                continue
            offset, b_future, h_future = pending.popleft()
            yield offset, b_future.result(), h_future.result()
        while pending:
            offset, b_future, h_future = pending.popleft()
            yield offset, b_future.result(), h_future.result()


def unique_cases(cases: Iterable[Case]) -> list[Case]:
    """Drop exact duplicate inputs (the first occurrence keeps its source and label)."""
    seen: set[bytes] = set()
    out = []
    for c in cases:
        key = _SORTED_ENCODER.encode(c.input)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out
