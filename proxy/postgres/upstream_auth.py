"""The proxy's own login to the target, sans I/O: answers AuthenticationRequests.

The proxy holds the target's credentials; the client authenticated to the
proxy with its token and never sees this exchange. Supported: trust (the
target asks nothing), cleartext, md5 and SCRAM-SHA-256 (via `scramp`, without
channel binding since the upstream link is plain TCP).
"""

from __future__ import annotations

import hashlib

import scramp

from ingest.errors import CustodyError

from ingest.protocols.postgres import messages as m

SCRAM_MECHANISM = "SCRAM-SHA-256"


class UpstreamAuthError(CustodyError):
    """The proxy cannot log in to the target (unsupported method, missing or wrong secret)."""


def md5_password(user: str, password: str, salt: bytes) -> str:
    """PostgreSQL's md5 answer: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


_KERBEROS = frozenset({"GSS", "GSSContinue", "SSPI"})


class UpstreamLogin:
    """One login attempt: feed each AuthenticationRequest, send back what it returns."""

    def __init__(self, user: str, password: str | None) -> None:
        self.user, self._password = user, password
        self._scram: scramp.ScramClient | None = None
        self._server_proved = False
        self.method = "trust"

    def respond(self, request: m.AuthenticationRequest) -> bytes | None:
        """The message to send upstream, or None when there is nothing to send (Ok, SASLFinal)."""
        handler = getattr(self, f"_on_{request.method}", None)
        if handler is None:
            instead = ("; give the proxy's upstream user a password (scram-sha-256 in pg_hba.conf) or a trust/cert "
                       "line for the proxy's address" if request.method in _KERBEROS else "")
            raise UpstreamAuthError(
                f"the target asks for {request.method} authentication, which the proxy does not support{instead}")
        return handler(request)

    def _secret(self) -> str:
        if self._password is None:
            raise UpstreamAuthError("the target asks for a password but none is configured (upstream_password_file/_env)")
        return self._password

    def _on_Ok(self, request: m.AuthenticationRequest) -> None:
        if self._scram is not None and not self._server_proved:
            raise UpstreamAuthError("the target accepted the login before proving it knows the SCRAM secret")
        return None

    def _on_CleartextPassword(self, request: m.AuthenticationRequest) -> bytes:
        self.method = "password"
        return m.password_message(self._secret())

    def _on_MD5Password(self, request: m.AuthenticationRequest) -> bytes:
        self.method = "md5"
        return m.password_message(md5_password(self.user, self._secret(), request.salt))

    def _on_SASL(self, request: m.AuthenticationRequest) -> bytes:
        if SCRAM_MECHANISM not in request.mechanisms:
            raise UpstreamAuthError(f"the target offers SASL {list(request.mechanisms)}, not {SCRAM_MECHANISM}")
        self.method = SCRAM_MECHANISM
        # PostgreSQL uses the startup user and ignores the SCRAM one; scramp insists on one.
        self._scram = scramp.ScramClient([SCRAM_MECHANISM], self.user, self._secret())
        return m.sasl_initial_response(SCRAM_MECHANISM, self._scram.get_client_first().encode())

    def _on_SASLContinue(self, request: m.AuthenticationRequest) -> bytes:
        scram = self._require_scram()
        try:
            scram.set_server_first(request.data.decode())
            return m.sasl_response(scram.get_client_final().encode())
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise UpstreamAuthError(f"SCRAM exchange with the target failed: {exc}") from None

    def _on_SASLFinal(self, request: m.AuthenticationRequest) -> None:
        scram = self._require_scram()
        try:
            scram.set_server_final(request.data.decode())
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise UpstreamAuthError(f"the target failed to prove it knows the SCRAM secret: {exc}") from None
        self._server_proved = True
        return None

    def _require_scram(self) -> scramp.ScramClient:
        if self._scram is None:
            raise UpstreamAuthError("the target sent a SASL message outside a SASL exchange")
        return self._scram
