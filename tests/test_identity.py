"""Caller identity: valid tokens verify, every known attack is refused with its own reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import fastavro
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import schemas
from proxy.devidp import create_dev_idp, issue_token
from proxy.identity import AuthenticationError, Identity, Reason, TokenVerifier

ISSUER = "https://idp.test/"
AUDIENCE = "custody"


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class DevIdp:
    key: Path
    jwks: Path
    kid: str

    def token(self, subject: str = "alice", **kwargs: Any) -> str:
        kwargs.setdefault("groups", ["dba", "oncall"])
        return issue_token(self.key, ISSUER, AUDIENCE, subject, **kwargs)

    def signed(self, claims: dict[str, Any], kid: str | None = None) -> str:
        """Claims exactly as given, signed with the dev key; `kid` None = no kid header."""
        private = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        headers = {"kid": kid} if kid is not None else None
        return jwt.encode(claims, private, algorithm="EdDSA", headers=headers)


@pytest.fixture
def idp(tmp_path: Path) -> DevIdp:
    kid = create_dev_idp(tmp_path / "dev-idp.key", tmp_path / "dev-idp.jwks.json")
    return DevIdp(tmp_path / "dev-idp.key", tmp_path / "dev-idp.jwks.json", kid)


def verifier(jwks: str | Path, **kwargs: Any) -> TokenVerifier:
    return TokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=jwks, **kwargs)


def refused(token: str, v: TokenVerifier) -> Reason:
    with pytest.raises(AuthenticationError) as info:
        v.verify(token)
    assert "\n" not in info.value.message
    return info.value.reason_code


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A hand-built compact JWS, signed with whatever bytes the attacker likes."""
    parts = [b64url(json.dumps(part).encode()) for part in (header, claims)]
    return ".".join([*parts, b64url(signature)])


def good_claims(**overrides: Any) -> dict[str, Any]:
    """Plain JSON claims (timestamps as integers), so that forge() can use them too."""
    now = int(datetime.now(timezone.utc).timestamp())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "iat": now, "exp": now + 3600}
    return {**claims, **overrides}


def read_jwks(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_jwks(path: Path, *keys: dict[str, Any]) -> None:
    path.write_text(json.dumps({"keys": list(keys)}))


def rsa_key(kid: str, alg: str | None = "RS256") -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True) | {"kid": kid}
    return private, (jwk | {"alg": alg} if alg else jwk)


def ec_key(kid: str) -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return private, jwk | {"kid": kid, "alg": "ES256"}


# --- valid tokens ---------------------------------------------------------


def test_valid_token_gives_identity(idp: DevIdp) -> None:
    token = idp.token(
        "00u1a2b3", email="alice@example.com", extra_claims={"preferred_username": "alice"}
    )
    identity = verifier(idp.jwks, username_claim="preferred_username").verify(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert identity == Identity(
        subject="00u1a2b3",
        username="alice",
        email="alice@example.com",
        groups=("dba", "oncall"),
        issuer=ISSUER,
        token_id=claims["jti"],
        expires_at=datetime.fromtimestamp(claims["exp"], tz=timezone.utc),
    )
    assert identity.expires_at - datetime.now(timezone.utc) > timedelta(minutes=59)


def test_username_defaults_to_sub_and_groups_to_empty(idp: DevIdp) -> None:
    token = issue_token(idp.key, ISSUER, AUDIENCE, "bob", [])
    identity = verifier(idp.jwks).verify(token)
    assert (identity.username, identity.email, identity.groups) == ("bob", None, ())


def test_to_avro_is_the_schema_identity_record(idp: DevIdp) -> None:
    record = _identity_schema()
    avro = verifier(idp.jwks).verify(idp.token(email="a@example.com")).to_avro()
    assert list(avro) == [f["name"] for f in record["fields"]]
    assert fastavro.validation.validate(avro, fastavro.parse_schema(record), raise_errors=True)


def _identity_schema() -> dict[str, Any]:
    session_start = next(
        branch for branch in schemas.load_json("event.avsc")["fields"][-1]["type"]
        if branch["name"] == "SessionStart"
    )
    identity_field = next(f for f in session_start["fields"] if f["name"] == "identity")
    return identity_field["type"][1] | {"namespace": "custody"}


def test_rs256_and_es256_tokens_verify(idp: DevIdp) -> None:
    rsa_private, rsa_jwk = rsa_key("rsa-1")
    ec_private, ec_jwk = ec_key("ec-1")
    write_jwks(idp.jwks, *read_jwks(idp.jwks)["keys"], rsa_jwk, ec_jwk)
    v = verifier(idp.jwks)
    for private, alg, kid in ((rsa_private, "RS256", "rsa-1"), (ec_private, "ES256", "ec-1")):
        token = jwt.encode(good_claims(sub=alg), private, algorithm=alg, headers={"kid": kid})
        assert v.verify(token).subject == alg


def test_expiry_within_leeway_is_accepted(idp: DevIdp) -> None:
    token = idp.token(ttl=timedelta(seconds=-10))
    assert verifier(idp.jwks).verify(token).subject == "alice"


# --- attacks, each with its own reason ----------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_unsigned_token_is_refused(idp: DevIdp, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT", "kid": idp.kid}, good_claims())
    assert refused(token, verifier(idp.jwks)) == Reason.ALG_NOT_ALLOWED


@pytest.mark.parametrize("secret_from", ["pem", "jwk_json", "jwks_file", "raw_x"])
def test_hs256_signed_with_the_public_key_is_refused(idp: DevIdp, secret_from: str) -> None:
    """The classic confusion: the public key, used as an HMAC secret, must not verify anything."""
    jwk = read_jwks(idp.jwks)["keys"][0]
    public = jwt.PyJWK(jwk).key
    secret = {
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "jwk_json": json.dumps(jwk).encode(),
        "jwks_file": idp.jwks.read_bytes(),
        "raw_x": base64.urlsafe_b64decode(jwk["x"] + "=="),
    }[secret_from]
    header = {"alg": "HS256", "typ": "JWT", "kid": idp.kid}
    unsigned = forge(header, good_claims()).rsplit(".", 1)[0]
    token = unsigned + "." + b64url(hmac.new(secret, unsigned.encode(), hashlib.sha256).digest())
    assert refused(token, verifier(idp.jwks)) == Reason.ALG_NOT_ALLOWED


def test_alg_is_checked_before_any_key_is_fetched(tmp_path: Path) -> None:
    token = forge({"alg": "HS256", "kid": "whatever"}, good_claims(), b"sig")
    assert refused(token, verifier(tmp_path / "does-not-exist.json")) == Reason.ALG_NOT_ALLOWED


def test_allow_list_refuses_a_valid_signature_of_another_alg(idp: DevIdp) -> None:
    private, jwk = rsa_key("rsa-1")
    write_jwks(idp.jwks, jwk)
    token = jwt.encode(good_claims(), private, algorithm="RS256", headers={"kid": "rsa-1"})
    assert refused(token, verifier(idp.jwks, algorithms=["EdDSA"])) == Reason.ALG_NOT_ALLOWED


def test_token_alg_must_match_the_key_kind(idp: DevIdp) -> None:
    """ES256 naming an RSA key (with or without its own alg), PS256 naming an RS256 key."""
    rsa_private, rsa_jwk = rsa_key("rsa-1")
    _, bare_rsa_jwk = rsa_key("rsa-bare", alg=None)
    ec_private, _ = ec_key("unused")
    write_jwks(idp.jwks, rsa_jwk, bare_rsa_jwk)
    v = verifier(idp.jwks, algorithms=["RS256", "PS256", "ES256"])
    for private, alg, kid in (
        (ec_private, "ES256", "rsa-1"),
        (ec_private, "ES256", "rsa-bare"),
        (rsa_private, "PS256", "rsa-1"),
    ):
        token = jwt.encode(good_claims(), private, algorithm=alg, headers={"kid": kid})
        assert refused(token, v) == Reason.ALG_NOT_ALLOWED


def test_key_without_alg_verifies_any_alg_of_its_kind(idp: DevIdp) -> None:
    private, jwk = rsa_key("rsa-1", alg=None)
    write_jwks(idp.jwks, jwk)
    token = jwt.encode(good_claims(), private, algorithm="PS256", headers={"kid": "rsa-1"})
    assert verifier(idp.jwks, algorithms=["PS256"]).verify(token).subject == "mallory"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_weak_rsa_key_in_jwks_is_not_used(idp: DevIdp) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    write_jwks(idp.jwks, RSAAlgorithm.to_jwk(private.public_key(), as_dict=True) | {"kid": "weak"})
    token = jwt.encode(good_claims(), private, algorithm="RS256", headers={"kid": "weak"})
    assert refused(token, verifier(idp.jwks)) == Reason.JWKS_UNAVAILABLE


def test_expired_token_is_refused(idp: DevIdp) -> None:
    token = idp.token(ttl=-timedelta(minutes=5))
    assert refused(token, verifier(idp.jwks)) == Reason.EXPIRED


def test_token_from_the_future_is_refused(idp: DevIdp) -> None:
    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    token = idp.token(extra_claims={"nbf": later})
    assert refused(token, verifier(idp.jwks)) == Reason.NOT_YET_VALID


def test_wrong_audience_is_refused(idp: DevIdp) -> None:
    token = issue_token(idp.key, ISSUER, "some-other-service", "alice", [])
    assert refused(token, verifier(idp.jwks)) == Reason.WRONG_AUDIENCE


def test_wrong_issuer_is_refused(idp: DevIdp) -> None:
    token = issue_token(idp.key, "https://evil.test/", AUDIENCE, "alice", [])
    assert refused(token, verifier(idp.jwks)) == Reason.WRONG_ISSUER


def test_unknown_kid_is_refused(idp: DevIdp) -> None:
    token = idp.signed(good_claims(), kid="not-a-key")
    assert refused(token, verifier(idp.jwks)) == Reason.UNKNOWN_KID


def test_tampered_payload_is_refused(idp: DevIdp) -> None:
    header, _, signature = idp.token(groups=["readers"]).split(".")
    claims = good_claims(sub="alice", groups=["admins"])
    payload = b64url(json.dumps(claims).encode())
    token = f"{header}.{payload}.{signature}"
    assert refused(token, verifier(idp.jwks)) == Reason.BAD_SIGNATURE


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "sub"])
def test_missing_required_claim_is_refused(idp: DevIdp, claim: str) -> None:
    claims = good_claims()
    del claims[claim]
    token = idp.signed(claims, kid=idp.kid)
    assert refused(token, verifier(idp.jwks)) == Reason.MISSING_CLAIM


def test_missing_username_claim_is_refused(idp: DevIdp) -> None:
    v = verifier(idp.jwks, username_claim="preferred_username")
    assert refused(idp.token(), v) == Reason.MISSING_CLAIM


@pytest.mark.parametrize("groups", ["admins", [1, 2], {"admins": True}])
def test_groups_must_be_an_array_of_strings(idp: DevIdp, groups: Any) -> None:
    token = idp.token(extra_claims={"groups": groups})
    assert refused(token, verifier(idp.jwks)) == Reason.MALFORMED


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9", "x" * 20_000, "\x00\n", "é.é.é"],
)
def test_garbage_is_malformed(idp: DevIdp, token: str) -> None:
    assert refused(token, verifier(idp.jwks)) == Reason.MALFORMED


def test_missing_kid_is_malformed(idp: DevIdp) -> None:
    token = idp.signed(good_claims())
    assert refused(token, verifier(idp.jwks)) == Reason.MALFORMED


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


_fuzz = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_claim_names = ["iss", "aud", "sub", "exp", "nbf", "iat", "jti", "groups", "email", "username"]


@_fuzz
@given(
    header=st.fixed_dictionaries(
        {}, optional={"alg": st.sampled_from(["EdDSA", "RS256", "none"]) | _json, "kid": _json}
    ),
    claims=st.dictionaries(st.sampled_from(_claim_names), _json),
    signature=st.binary(max_size=80),
)
def test_arbitrary_tokens_only_ever_raise_authentication_error(
    idp: DevIdp, header: dict[str, Any], claims: dict[str, Any], signature: bytes
) -> None:
    with pytest.raises(AuthenticationError):
        verifier(idp.jwks).verify(forge(header, claims, signature))


@_fuzz
@given(claims=st.dictionaries(st.sampled_from(_claim_names), _json))
def test_signed_odd_claims_verify_or_raise_authentication_error(
    idp: DevIdp, claims: dict[str, Any]
) -> None:
    """Even a validly signed token with odd claim values must not crash the verifier."""
    try:
        token = idp.token(extra_claims=claims)
    except (TypeError, ValueError, OverflowError):
        return  # PyJWT cannot encode it, so no IdP could send it
    try:
        verifier(idp.jwks, username_claim="username").verify(token)
    except AuthenticationError:
        pass


# --- configuration --------------------------------------------------------


@pytest.mark.parametrize("algorithms", [["HS256"], ["none"], ["RS256", "HS512"], []])
def test_unsafe_allow_list_is_a_configuration_error(idp: DevIdp, algorithms: list[str]) -> None:
    with pytest.raises(ValueError):
        verifier(idp.jwks, algorithms=algorithms)


@pytest.mark.parametrize("url", ["http://idp.example.com/jwks", "ftp://idp.example.com/jwks"])
def test_jwks_url_must_be_https(url: str) -> None:
    with pytest.raises(ValueError):
        verifier(url)


# --- JWKS: refresh, rate limit, URL source --------------------------------


def test_rotation_is_picked_up_without_restart(idp: DevIdp, tmp_path: Path) -> None:
    clock = FakeClock()
    v = verifier(idp.jwks, clock=clock)
    assert v.verify(idp.token()).subject == "alice"

    new_kid = create_dev_idp(tmp_path / "next.key", tmp_path / "next.jwks.json")
    next_keys = read_jwks(tmp_path / "next.jwks.json")["keys"]
    write_jwks(idp.jwks, *read_jwks(idp.jwks)["keys"], *next_keys)
    rotated = issue_token(tmp_path / "next.key", ISSUER, AUDIENCE, "carol", [])
    assert jwt.get_unverified_header(rotated)["kid"] == new_kid

    assert refused(rotated, v) == Reason.UNKNOWN_KID  # just fetched: rate-limited
    clock.now += 30
    assert v.verify(rotated).subject == "carol"
    assert v.verify(idp.token()).subject == "alice"


def test_withdrawn_key_stops_verifying_after_max_age(idp: DevIdp, tmp_path: Path) -> None:
    clock = FakeClock()
    v = verifier(idp.jwks, clock=clock, max_age=600)
    token = idp.token()
    v.verify(token)
    write_jwks(idp.jwks)
    clock.now += 599
    v.verify(token)
    clock.now += 1
    assert refused(token, v) == Reason.UNKNOWN_KID


@dataclass
class JwksServer:
    """A real HTTP server on loopback serving a JWKS, counting the requests it gets."""

    body: bytes
    requests: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def jwks_server(idp: DevIdp) -> Iterator[JwksServer]:
    state = JwksServer(idp.jwks.read_bytes())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/jwks")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def test_jwks_url_source(idp: DevIdp, jwks_server: JwksServer) -> None:
    v = verifier(jwks_server.url + "/jwks", allow_insecure_http=True)
    assert v.verify(idp.token()).subject == "alice"
    assert v.verify(idp.token("bob")).subject == "bob"
    assert jwks_server.requests == ["/jwks"]  # cached


def test_random_kid_flood_is_rate_limited(idp: DevIdp, jwks_server: JwksServer) -> None:
    clock = FakeClock()
    v = verifier(jwks_server.url + "/jwks", allow_insecure_http=True, clock=clock)
    for window in (1, 2):
        for _ in range(50):
            token = idp.signed(good_claims(), kid=uuid.uuid4().hex)
            assert refused(token, v) == Reason.UNKNOWN_KID
        assert len(jwks_server.requests) == window
        clock.now += 30


def test_redirects_are_not_followed(idp: DevIdp, jwks_server: JwksServer) -> None:
    v = verifier(jwks_server.url + "/redirect", allow_insecure_http=True)
    assert refused(idp.token(), v) == Reason.JWKS_UNAVAILABLE
    assert jwks_server.requests == ["/redirect"]


def test_unreachable_or_broken_jwks_is_unavailable(
    idp: DevIdp, jwks_server: JwksServer, tmp_path: Path
) -> None:
    jwks_server.body = b"<html>maintenance</html>"
    v = verifier(jwks_server.url + "/jwks", allow_insecure_http=True)
    assert refused(idp.token(), v) == Reason.JWKS_UNAVAILABLE
    assert refused(idp.token(), verifier(tmp_path / "missing.json")) == Reason.JWKS_UNAVAILABLE


def test_failed_refresh_keeps_known_keys(idp: DevIdp, jwks_server: JwksServer) -> None:
    clock = FakeClock()
    v = verifier(jwks_server.url + "/jwks", allow_insecure_http=True, clock=clock, max_age=60)
    v.verify(idp.token())
    jwks_server.body = b"oops"
    clock.now += 60
    assert v.verify(idp.token()).subject == "alice"  # stale but known, IdP broken
    assert len(jwks_server.requests) == 2
    token = idp.signed(good_claims(), kid="new")
    assert refused(token, v) == Reason.JWKS_UNAVAILABLE  # cannot tell whether "new" exists


# --- dev IdP --------------------------------------------------------------


def test_dev_key_is_private_and_jwks_is_eddsa(idp: DevIdp) -> None:
    assert stat.S_IMODE(idp.key.stat().st_mode) == 0o600
    (jwk,) = read_jwks(idp.jwks)["keys"]
    assert (jwk["kid"], jwk["alg"], jwk["kty"], jwk["crv"]) == (idp.kid, "EdDSA", "OKP", "Ed25519")
    assert "d" not in jwk
    assert idp.kid.startswith("dev-")


def test_dev_idp_refuses_to_overwrite(idp: DevIdp, tmp_path: Path) -> None:
    key_before = idp.key.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        create_dev_idp(idp.key, tmp_path / "other.jwks.json")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        create_dev_idp(tmp_path / "other.key", idp.jwks)
    assert idp.key.read_bytes() == key_before
    assert not (tmp_path / "other.key").exists()


def test_issued_token_carries_the_oidc_claims(idp: DevIdp) -> None:
    token = idp.token(email="alice@example.com")
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": idp.kid, "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) == {"iss", "aud", "sub", "groups", "email", "iat", "nbf", "exp", "jti"}
    assert claims["exp"] - claims["iat"] == 3600


def test_issue_token_rejects_a_single_group_string(idp: DevIdp) -> None:
    with pytest.raises(TypeError):
        issue_token(idp.key, ISSUER, AUDIENCE, "alice", "admins")
