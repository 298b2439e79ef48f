"""TLS from the proxy to the target, against a PostgreSQL cluster of the test's own that accepts only TLS
(`hostssl`, a test CA), with psycopg through the proxy: verify-full works and SessionStart names the
target's TLS version and certificate; a wrong CA, a wrong host name and a target without TLS are refused,
with the reason in the client's error and in the events; `disable` stays plaintext.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import psycopg
import pytest

from ingest.settings import ConfigError, Table
from pg_cluster import Cluster
from pg_fixtures import EventLog, make_tls, messages, new_app, start_proxy
from proxy.core.settings import UpstreamTLS


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("other-tls"))["ca"]


@pytest.fixture(scope="module")
def cluster(tls):
    running = Cluster(tls=tls, listen=("127.0.0.1", "127.0.0.2")).start()
    yield running
    running.stop()


def _entry(name: str, host: str, port: int, mode: str, ca=None) -> str:
    lines = [f'[[proxy]]\nname = "{name}"\nprotocol = "postgres"\nlisten = "127.0.0.1:0"',
             f'upstream = "postgresql://postgres@{host}:{port}/postgres"', f'upstream_tls = "{mode}"']
    if ca is not None:
        lines.append(f'upstream_ca = "{ca}"')
    return "\n" + "\n".join(lines) + "\n"


FULL, WRONG_CA, WRONG_HOST, VERIFY_CA, REQUIRE_PLAIN, REQUIRE, BOTH = 1, 2, 3, 4, 5, 6, 7


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, cluster, tls, other_ca):
    entries = "".join([
        _entry("tls-full", "127.0.0.1", cluster.port, "verify-full", tls["ca"]),
        _entry("tls-wrong-ca", "127.0.0.1", cluster.port, "verify-full", other_ca),
        _entry("tls-wrong-host", "127.0.0.2", cluster.port, "verify-full", tls["ca"]),  # the cert names 127.0.0.1
        _entry("tls-verify-ca", "127.0.0.2", cluster.port, "verify-ca", tls["ca"]),
        _entry("tls-require-plain", "127.0.0.1", 5432, "require"),  # the machine's PostgreSQL has ssl = off
        _entry("tls-require", "127.0.0.1", cluster.port, "require"),
        _entry("tls-both", "127.0.0.1", cluster.port, "verify-full", tls["ca"])
        + f'tls_cert = "{tls["server_cert"]}"\ntls_key = "{tls["server_key"]}"\n',  # TLS to the client too
    ])
    running = start_proxy(tmp_path_factory.mktemp("custody"), broker, extra_proxies=entries,
                          replace={'policy = "policies/default.toml"': "# no policy"})
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


def server_cert_sha256(tls) -> str:
    der = ssl.PEM_cert_to_DER_cert(tls["server_cert"].read_text())
    return hashlib.sha256(der).hexdigest()


def proxy_errors(events) -> list[tuple[str, str]]:
    return [(m["error_code"], m["error_message"]) for m in messages(events, "server")
            if m["type"] == "ErrorResponse" and m["attributes"].get("origin") == "proxy"]


def test_verify_full_relays_over_tls_and_session_start_names_the_target_certificate(proxy, tls):
    app = new_app("tls-full")
    with psycopg.connect(proxy.dsn(index=FULL, application_name=app)) as conn:
        row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row[0] is True and row[1].startswith("TLSv1.")
        assert conn.execute("SELECT 6 * 7").fetchone() == (42,)
    events = proxy.events.session(app)
    start = events[0].body
    assert start["identity"]["subject"] == "alice@example.com"
    assert start["attributes"]["upstream_tls"] == row[1]
    assert start["attributes"]["upstream_cert_sha256"] == server_cert_sha256(tls)
    assert "tls" not in start["attributes"]  # the client side was plaintext (sslmode=disable)
    assert events[-1].body["reason"] == "client_terminate"


def test_psql_with_sslmode_verify_full_to_the_proxy_and_the_proxy_verified_to_the_target(proxy, tls):
    """Both legs encrypted and verified: psql checks the proxy's certificate, the proxy checks the target's."""
    import os
    import subprocess

    app = new_app("tls-psql")
    host, port = proxy.address(BOTH)
    conninfo = (f"host={host} port={port} user=alice@example.com dbname=postgres application_name={app} "
                f"sslmode=verify-full sslrootcert={tls['ca']}")
    result = subprocess.run(["psql", conninfo, "-At", "-c",
                             "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"],
                            env={**os.environ, "PGPASSWORD": proxy.token()}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "t", result.stderr
    refused = subprocess.run(["psql", conninfo.replace(f"sslrootcert={tls['ca']}", "sslrootcert=/dev/null"),
                              "-c", "SELECT 1"], env={**os.environ, "PGPASSWORD": proxy.token()},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "certificate" in refused.stderr.lower()
    start = proxy.events.session(app)[0].body
    assert start["attributes"]["tls"].startswith("TLSv1.") and start["attributes"]["upstream_tls"].startswith("TLSv1.")
    assert start["attributes"]["upstream_cert_sha256"] == server_cert_sha256(tls)


def test_verify_ca_does_not_check_the_host_name(proxy, tls):
    app = new_app("tls-ca")
    with psycopg.connect(proxy.dsn(index=VERIFY_CA, application_name=app)) as conn:
        assert conn.execute("SELECT inet_server_addr()::text").fetchone() == ("127.0.0.2/32",)
    start = proxy.events.session(app)[0].body
    assert start["attributes"]["upstream_cert_sha256"] == server_cert_sha256(tls)


def test_require_encrypts_without_verifying(proxy):
    app = new_app("tls-require")
    with psycopg.connect(proxy.dsn(index=REQUIRE, application_name=app)) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    assert proxy.events.session(app)[0].body["attributes"]["upstream_tls"].startswith("TLSv1.")


@pytest.mark.parametrize("index, reason", [
    (WRONG_CA, "certificate verify failed"),  # same CA name, another key: "certificate signature failure"
    (WRONG_HOST, "IP address mismatch"),
    (REQUIRE_PLAIN, 'the target does not offer TLS, and upstream_tls = "require" requires it'),
])
def test_an_unverified_or_plaintext_target_is_refused_with_the_reason(proxy, index, reason):
    app = new_app("tls-refused")
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(proxy.dsn(index=index, application_name=app))
    assert reason in str(refused.value) and "is unavailable" in str(refused.value)
    events = proxy.events.session(app)
    start, end = events[0].body, events[-1].body
    assert start["identity"]["subject"] == "alice@example.com"  # who tried, though the target was refused
    assert "upstream_tls" not in start["attributes"]
    assert end["reason"] == "upstream_unavailable"
    [(code, message)] = proxy_errors(events)
    assert code == "08006" and reason in message


def test_disable_stays_plaintext(proxy):
    app = new_app("tls-off")
    with psycopg.connect(proxy.dsn(index=0, application_name=app)) as conn:  # 127.0.0.1:5432: loopback → disable
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)
    start = proxy.events.session(app)[0].body
    assert "upstream_tls" not in start["attributes"] and "upstream_cert_sha256" not in start["attributes"]


def _table(**raw) -> Table:
    return Table(Path("/etc/custody/custody.toml"), "proxy.0", raw)


def test_upstream_tls_settings(tls):
    assert UpstreamTLS.from_table(_table(), "127.0.0.1").mode == "disable"
    assert UpstreamTLS.from_table(_table(), "localhost").mode == "disable"
    remote = UpstreamTLS.from_table(_table(), "db.internal")
    assert remote.mode == "verify-full" and remote.context.check_hostname and remote.server_hostname == "db.internal"
    verify_ca = UpstreamTLS.from_table(_table(upstream_tls="verify-ca", upstream_ca=str(tls["ca"])), "db")
    assert verify_ca.context.verify_mode == ssl.CERT_REQUIRED and not verify_ca.context.check_hostname
    with_cert = UpstreamTLS.from_table(_table(upstream_tls="verify-full", upstream_ca=str(tls["ca"]),
                                              upstream_client_cert=str(tls["client_cert"]),
                                              upstream_client_key=str(tls["client_key"])), "db")
    assert with_cert.enabled
    for raw, message in [
        ({"upstream_tls": "prefer"}, "upstream_tls: expected one of disable, require, verify-ca, verify-full"),
        ({"upstream_tls": "verify-full", "upstream_ca": "/nonexistent/ca.crt"}, "upstream_ca: cannot load"),
        ({"upstream_ca": str(tls["ca"])}, 'upstream_ca: has no effect with upstream_tls = "disable"'),
        ({"upstream_tls": "require", "upstream_ca": str(tls["ca"])}, "upstream_ca: is not used with"),
        ({"upstream_tls": "require", "upstream_client_key": str(tls["client_key"])}, "needs upstream_client_cert"),
    ]:
        with pytest.raises(ConfigError) as error:
            UpstreamTLS.from_table(_table(**raw), "127.0.0.1")
        assert str(error.value).startswith("/etc/custody/custody.toml: [proxy.0] ") and message in str(error.value)
