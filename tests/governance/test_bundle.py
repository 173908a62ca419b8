"""Signed bundles: settings validation, build and signature check by the real OPA, git revisions."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mcp_fhir._exceptions import ConfigError, PolicyUnavailable
from mcp_fhir.governance.bundle import (
    BundleSettings,
    build_bundle,
    bundle_config,
    git_revision,
    verify_bundle,
)

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    paths = []
    for name in ("priv", "other"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        priv = folder / f"{name}.pem"
        priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
        pub = folder / f"{name}.pub.pem"
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
        paths += [priv, pub]
    return paths[0], paths[1], paths[3]


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle, "r:gz") as tar:
        return {m.name.lstrip("/"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_a_missing_signing_key_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        BundleSettings(policies=POLICIES, output=tmp_path / "b.tar.gz", signing_key=tmp_path / "nope.pem")
    assert err.value.key == "policy.bundle.signing_key"


def test_an_unknown_signing_algorithm_is_refused(tmp_path, keys):
    with pytest.raises(ConfigError) as err:
        BundleSettings(
            policies=POLICIES, output=tmp_path / "b.tar.gz", signing_key=keys[0], signing_alg="HS1"
        )
    assert err.value.key == "policy.bundle.signing_alg"


def test_a_built_bundle_is_signed_carries_its_revision_and_leaves_tests_out(tmp_path, keys, opa_binary):
    out = tmp_path / "bundle.tar.gz"
    revision = build_bundle(BundleSettings(policies=POLICIES, output=out, signing_key=keys[0],
                                           verification_key=keys[1], revision="r-123"))  # fmt: skip
    files = members(out)
    assert revision == "r-123"
    assert b'"revision":"r-123"' in files[".manifest"].replace(b" ", b"")
    assert ".signatures.json" in files
    assert "mcp_fhir/authz/authz.rego" in files
    assert not [n for n in files if n.endswith("_test.rego") or n.startswith("fixtures") or "approvals" in n]


def test_a_tampered_bundle_or_the_wrong_key_fails_verification(tmp_path, keys, opa_binary):
    out = tmp_path / "bundle.tar.gz"
    build_bundle(BundleSettings(policies=POLICIES, output=out, signing_key=keys[0], revision="r-1"))
    verify_bundle(out, keys[1])
    with pytest.raises(PolicyUnavailable) as wrong_key:
        verify_bundle(out, keys[2])
    assert wrong_key.value.code == "opa_unavailable"
    files = members(out)
    files["mcp_fhir/authz/rbac.rego"] += b"\n# harmless-looking edit\n"
    tampered = tmp_path / "tampered.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo("/" + name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    tampered.write_bytes(buf.getvalue())
    with pytest.raises(PolicyUnavailable) as err:
        verify_bundle(tampered, keys[1])
    assert "digest mismatch" in err.value.message


def test_the_revision_is_the_short_commit_with_dirty_when_the_folder_has_changes(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.email=t@example.org", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x")
    (tmp_path / "policies").mkdir()
    sha = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short=12", "HEAD"], check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert git_revision(tmp_path / "policies") == sha
    (tmp_path / "policies" / "p.rego").write_text("package x\n")
    assert git_revision(tmp_path / "policies") == f"{sha}-dirty"


def test_outside_a_repository_the_revision_must_be_given(tmp_path):
    with pytest.raises(ConfigError) as err:
        git_revision(tmp_path)
    assert err.value.key == "policy.bundle.revision"


def test_the_opa_config_verifies_with_the_named_key():
    cfg = bundle_config(service_url="https://bundles.example.org", resource="mcp-fhir/bundle.tar.gz",
                        public_key_pem="PEM", key_id="k1", alg="RS256")  # fmt: skip
    assert cfg["bundles"]["authz"]["signing"] == {"keyid": "k1"}
    assert cfg["keys"]["k1"] == {"algorithm": "RS256", "key": "PEM"}
    assert cfg["bundles"]["authz"]["resource"] == "mcp-fhir/bundle.tar.gz"
