"""Signed OPA bundles of `policies/`, the OPA configuration that verifies them, and their status.

    revision = git short sha (+ "-dirty" when policies/ has uncommitted changes)
    opa build -b policies/ --signing-key priv.pem --signing-alg RS256 --revision <revision> -o bundle.tar.gz

Tests (`*_test.rego`), the fixture corpus and `approvals.yaml` are not policy and stay out of the
bundle. OPA verifies a downloaded bundle with the public key named in its configuration
(`bundle_config`); on a signature or digest failure it keeps the bundle it had (or none) and
reports the error in `GET /v1/status`, which `bundle_status` reads. The sidecar's readiness
compares the active revision with `opa.expected_revision`.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from mcp_fhir._exceptions import ConfigError, PolicyUnavailable
from mcp_fhir.policy.managed_opa import find_opa

__all__ = [
    "BUNDLE_EXCLUDES",
    "DEFAULT_BUILD_TIMEOUT",
    "DEFAULT_SIGNING_ALG",
    "DEFAULT_STATUS_TIMEOUT",
    "BundleSettings",
    "BundleStatus",
    "build_bundle",
    "bundle_config",
    "bundle_status",
    "git_revision",
]

DEFAULT_SIGNING_ALG = "RS256"
SIGNING_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"})
DEFAULT_BUILD_TIMEOUT = 120.0
DEFAULT_GIT_TIMEOUT = 10.0
DEFAULT_STATUS_TIMEOUT = 2.0
DEFAULT_BUNDLE_NAME = "authz"
DEFAULT_KEY_ID = "mcp-fhir-policy"
BUNDLE_EXCLUDES = ("*_test.rego", "fixtures", "approvals.yaml")


def git_revision(path: Path, *, timeout: float = DEFAULT_GIT_TIMEOUT) -> str:
    """The short commit of the repository holding `path`, with `-dirty` when `path` has uncommitted changes."""

    def git(*args: str) -> str:
        try:
            proc = subprocess.run(
                ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError("policy.bundle.revision", "git is not available") from exc
        if proc.returncode != 0:
            raise ConfigError("policy.bundle.revision", "not inside a git repository; pass --revision")
        return proc.stdout.strip()

    sha = git("rev-parse", "--short=12", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=all", "--", ".")
    return f"{sha}-dirty" if dirty else sha


@dataclass(frozen=True, slots=True)
class BundleSettings:
    """What to build and how to sign it. Validated on construction."""

    policies: Path
    output: Path
    signing_key: Path
    verification_key: Path | None = None
    signing_alg: str = DEFAULT_SIGNING_ALG
    key_id: str = DEFAULT_KEY_ID
    revision: str | None = None
    timeout: float = DEFAULT_BUILD_TIMEOUT

    def __post_init__(self) -> None:
        if not self.policies.is_dir():
            raise ConfigError("policy.bundle.policies", "must be a folder")
        if not self.signing_key.is_file():
            raise ConfigError("policy.bundle.signing_key", "must be a PEM file")
        if self.verification_key is not None and not self.verification_key.is_file():
            raise ConfigError("policy.bundle.verification_key", "must be a PEM file")
        if self.signing_alg not in SIGNING_ALGS:
            raise ConfigError(
                "policy.bundle.signing_alg", "must be one of " + ", ".join(sorted(SIGNING_ALGS))
            )
        if self.revision is not None and (not self.revision or any(c.isspace() for c in self.revision)):
            raise ConfigError("policy.bundle.revision", "must be a non-empty word")
        if not 0 < self.timeout <= 3600:
            raise ConfigError("policy.bundle.timeout", "must be between 0 and 3600 seconds")


def _run(cmd: list[str], cwd: Path, timeout: float, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PolicyUnavailable(f"{what} did not finish in time") from exc
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[:3]  # opa build reports on stdout
        raise PolicyUnavailable(f"{what} failed: " + " | ".join(said))


def build_bundle(settings: BundleSettings, *, binary: str | None = None) -> str:
    """Build and sign the bundle; returns the revision it carries. With a verification key, check it after."""
    opa = find_opa(binary)
    revision = settings.revision or git_revision(settings.policies)
    output = settings.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = [opa, "build", "-b", ".", "-o", str(output), "--revision", revision,
           "--signing-key", str(settings.signing_key.resolve()), "--signing-alg", settings.signing_alg,
           "--verification-key-id", settings.key_id]  # fmt: skip
    for pattern in BUNDLE_EXCLUDES:
        cmd += ["--ignore", pattern]
    _run(cmd, settings.policies, settings.timeout, "opa build")
    if settings.verification_key is not None:
        verify_bundle(output, settings.verification_key, alg=settings.signing_alg, key_id=settings.key_id,
                      binary=opa, timeout=settings.timeout)  # fmt: skip
    return revision


def verify_bundle(
    bundle: Path,
    verification_key: Path,
    *,
    alg: str = DEFAULT_SIGNING_ALG,
    key_id: str = DEFAULT_KEY_ID,
    binary: str | None = None,
    timeout: float = DEFAULT_BUILD_TIMEOUT,
) -> None:
    """Raise `PolicyUnavailable` unless OPA accepts the bundle's signature and file digests."""
    opa = find_opa(binary)
    with tempfile.TemporaryDirectory() as tmp:
        # `opa eval` does not verify signatures; `opa build` of a signed bundle with a key does.
        cmd = [opa, "build", "-b", str(bundle.resolve()), "-o", str(Path(tmp) / "verified.tar.gz"),
               "--verification-key", str(verification_key.resolve()), "--verification-key-id", key_id,
               "--signing-alg", alg]  # fmt: skip
        _run(cmd, bundle.parent, timeout, "bundle verification")


def bundle_config(
    *,
    service_url: str,
    resource: str,
    public_key_pem: str,
    key_id: str = DEFAULT_KEY_ID,
    alg: str = DEFAULT_SIGNING_ALG,
    bundle_name: str = DEFAULT_BUNDLE_NAME,
    min_delay_seconds: int = 10,
    max_delay_seconds: int = 30,
) -> dict[str, Any]:
    """An OPA configuration that downloads `resource` from `service_url` and verifies its signature."""
    return {
        "services": {"policy": {"url": service_url}},
        "bundles": {
            bundle_name: {
                "service": "policy",
                "resource": resource,
                "persist": False,
                "polling": {"min_delay_seconds": min_delay_seconds, "max_delay_seconds": max_delay_seconds},
                "signing": {"keyid": key_id},
            }
        },
        "keys": {key_id: {"algorithm": alg, "key": public_key_pem}},
        # The status plugin makes GET /v1/status report each bundle's active revision and errors.
        "status": {"console": True},
        "decision_logs": {"console": True, "reporting": {"buffer_type": "event"}},
    }


@dataclass(frozen=True, slots=True)
class BundleStatus:
    """One bundle's state as OPA reports it."""

    name: str
    active_revision: str | None
    code: str | None
    message: str | None

    @property
    def activated(self) -> bool:
        return bool(self.active_revision)


async def bundle_status(
    client: httpx2.AsyncClient, opa_url: str, *, request_timeout: float = DEFAULT_STATUS_TIMEOUT
) -> dict[str, BundleStatus]:
    """`GET /v1/status` bundles, by name. Raises `PolicyUnavailable` when OPA cannot say."""
    try:
        response = await client.get(opa_url.rstrip("/") + "/v1/status", timeout=request_timeout)
        response.raise_for_status()
        body = response.json()
    except (httpx2.HTTPError, ValueError) as exc:
        raise PolicyUnavailable("OPA status is not available (is the status plugin enabled?)") from exc
    bundles = (body.get("result") or {}).get("bundles") or {}
    out = {}
    for name, b in bundles.items():
        if isinstance(b, Mapping):
            out[str(name)] = BundleStatus(
                name=str(name),
                active_revision=b.get("active_revision") or None,
                code=b.get("code"),
                message=b.get("message"),
            )
    return out
