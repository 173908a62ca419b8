"""Signing keys and our public JWKS (mcp_fhir/ehr/keys.py).

Golden source: HL7 SMART App Launch IG 2.x (HL7/smart-app-launch @2494e060) sample keys
``input/images/{RS384,ES384}.{public,private}.json`` and the signed examples in
``client-confidential-asymmetric.md`` / ``authorization-example-jwks-and-signatures.md`` /
``example-backend-services.md``, copied to tests/data/vendor-samples/ (see its SOURCES.md §7).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.ehr.keys import load_signing_key, public_jwks, signing_key_from_pem
from tests.data import VENDOR_SAMPLES

SAMPLES = VENDOR_SAMPLES
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def _json(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text())


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _spec_private_pem(name: str) -> tuple[bytes, dict[str, Any]]:
    """The SMART spec's sample private key (the JWK with a ``d``) as PEM, with its JWK."""
    jwk = next(k for k in _json(name)["keys"] if "d" in k)
    loader = RSAAlgorithm if jwk["kty"] == "RSA" else ECAlgorithm
    return _pem(loader.from_jwk(jwk)), jwk  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("private_file", "public_file", "members"),
    [
        ("smart_spec_jwks_rs384_private.json", "smart_spec_jwks_rs384_public.json", ("kty", "n", "e")),
        ("smart_spec_jwks_es384_private.json", "smart_spec_jwks_es384_public.json", ("kty", "crv", "x", "y")),
    ],
)
def test_jwks_derived_from_the_smart_spec_private_keys_matches_the_published_public_jwks(
    private_file: str, public_file: str, members: tuple[str, ...]
) -> None:
    # Source: HL7 SMART App Launch IG sample keys (RS384/ES384 .public/.private.json).
    pem, jwk = _spec_private_pem(private_file)
    key = signing_key_from_pem(pem, kid=jwk["kid"], algorithm=jwk["alg"], key="smart")
    published = _json(public_file)["keys"][0]
    ours = public_jwks([key])["keys"][0]
    for member in members:
        assert ours[member] == published[member], member
    assert ours["kid"] == published["kid"]
    assert ours["alg"] == "RS384" if jwk["kty"] == "RSA" else "ES384"
    assert ours["use"] == "sig"
    assert ours["key_ops"] == ["verify"]


@pytest.mark.parametrize(
    ("private_file", "token_field"),
    [
        ("smart_spec_jwks_rs384_private.json", "signed_jwt_rs384"),
        ("smart_spec_jwks_es384_private.json", "signed_jwt_es384"),
    ],
)
def test_the_spec_signed_examples_verify_against_the_jwks_we_derive(
    private_file: str, token_field: str
) -> None:
    # Source: SMART IG client-confidential-asymmetric.md worked example and
    # authorization-example-jwks-and-signatures.md (ES384); exp is in 2015, so the clock check is off.
    examples = _json("smart_spec_client_assertion_examples.json")
    pem, jwk = _spec_private_pem(private_file)
    ours = public_jwks([signing_key_from_pem(pem, kid=jwk["kid"], algorithm=jwk["alg"], key="smart")])
    public = jwt.PyJWK(ours["keys"][0])
    token = examples[token_field]
    claims = jwt.decode(
        token,
        public.key,
        algorithms=[jwk["alg"]],
        audience=examples["worked_example_payload"]["aud"],
        options={"verify_exp": False},
    )
    assert claims == examples["worked_example_payload"]
    assert jwt.get_unverified_header(token)["kid"] == jwk["kid"]


def test_the_spec_signed_examples_are_rejected_as_expired_by_a_real_clock() -> None:
    # Source: SMART IG worked example (exp 1422568860, long past).
    examples = _json("smart_spec_client_assertion_examples.json")
    pem, jwk = _spec_private_pem("smart_spec_jwks_rs384_private.json")
    ours = public_jwks([signing_key_from_pem(pem, kid=jwk["kid"], algorithm="RS384", key="smart")])
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(
            examples["signed_jwt_rs384"],
            jwt.PyJWK(ours["keys"][0]).key,
            algorithms=["RS384"],
            audience=examples["worked_example_payload"]["aud"],
        )


def test_the_backend_services_example_assertion_has_the_shape_smart_requires() -> None:
    # Source: SMART IG example-backend-services.md client_assertion (its signing key is not published,
    # so this is a structural check of header, claims and the token request form).
    examples = _json("smart_spec_client_assertion_examples.json")
    token = examples["backend_services_example_client_assertion_es384"]
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header == examples["backend_services_example_decoded_header"]
    assert header["alg"] in {"RS384", "ES384"} and header["typ"] == "JWT" and header["kid"]
    assert claims == examples["backend_services_example_decoded_payload"]
    assert claims["iss"] == claims["sub"]
    assert claims["aud"].endswith("/auth/token")
    assert 0 < len(claims["jti"]) <= 151
    form = dict(
        pair.split("=", 1) for pair in examples["backend_services_example_token_request_form"].split("&")
    )
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
    assert form["client_assertion"] == token


def test_public_jwks_never_contains_private_members() -> None:
    keys = [
        signing_key_from_pem(
            _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            kid="r",
            algorithm="RS384",
            key="k",
        ),
        signing_key_from_pem(
            _pem(ec.generate_private_key(ec.SECP384R1())), kid="e", algorithm="ES384", key="k"
        ),
    ]
    jwks = public_jwks(keys)
    assert [k["kid"] for k in jwks["keys"]] == ["r", "e"]
    for jwk in jwks["keys"]:
        assert not PRIVATE_MEMBERS & set(jwk), jwk


def test_a_signing_key_repr_hides_the_private_key() -> None:
    key = signing_key_from_pem(
        _pem(ec.generate_private_key(ec.SECP384R1())), kid="e", algorithm="ES384", key="k"
    )
    assert "[secure]" in repr(key)
    assert "PRIVATE" not in repr(key) and "EllipticCurve" not in repr(key)


def test_an_rsa_key_below_2048_bits_is_rejected() -> None:
    small = _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(ConfigError) as info:
        signing_key_from_pem(small, kid="r", algorithm="RS384", key="backends.epic.smart")
    assert info.value.code == "config_invalid"
    assert info.value.key == "backends.epic.smart"


def test_an_ec_key_on_the_wrong_curve_is_rejected_for_es384() -> None:
    p256 = _pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError) as info:
        signing_key_from_pem(p256, kid="e", algorithm="ES384", key="k")
    assert info.value.code == "config_invalid"


def test_an_rsa_key_is_rejected_for_es384_and_an_ec_key_for_rs384() -> None:
    with pytest.raises(ConfigError):
        signing_key_from_pem(_pem(rsa.generate_private_key(65537, 2048)), kid="x", algorithm="ES384", key="k")
    with pytest.raises(ConfigError):
        signing_key_from_pem(
            _pem(ec.generate_private_key(ec.SECP384R1())), kid="x", algorithm="RS384", key="k"
        )


def test_algorithms_outside_the_allow_list_are_rejected() -> None:
    with pytest.raises(ConfigError):
        signing_key_from_pem(_pem(rsa.generate_private_key(65537, 2048)), kid="x", algorithm="RS256", key="k")


def test_garbage_pem_is_a_config_error_that_does_not_echo_the_input() -> None:
    with pytest.raises(ConfigError) as info:
        signing_key_from_pem(
            b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
            kid="x",
            algorithm="RS384",
            key="k",
        )
    assert "c2VjcmV0" not in str(info.value)


def test_keys_load_from_a_file_or_from_the_environment(tmp_path: Path) -> None:
    pem = _pem(ec.generate_private_key(ec.SECP384R1()))
    path = tmp_path / "key.pem"
    path.write_bytes(pem)
    from_file = load_signing_key(file=path, env=None, kid="a", algorithm="ES384", key="k")
    from_env = load_signing_key(
        file=None, env="KEY", kid="a", algorithm="ES384", key="k", environ={"KEY": pem.decode()}
    )
    assert public_jwks([from_file]) == public_jwks([from_env])


def test_an_unset_key_environment_variable_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_signing_key(
            file=None, env="MISSING", kid="a", algorithm="ES384", key="backends.x.smart", environ={}
        )
    assert info.value.key == "backends.x.smart.private_key_env"


def test_duplicate_kids_are_rejected_in_a_jwks() -> None:
    key = signing_key_from_pem(
        _pem(ec.generate_private_key(ec.SECP384R1())), kid="same", algorithm="ES384", key="k"
    )
    with pytest.raises(ConfigError):
        public_jwks([key, key])
