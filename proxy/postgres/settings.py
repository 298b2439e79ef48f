"""The PostgreSQL keys of one `[[proxy]]` entry with `protocol = "postgres"` (the rest is the core's).

Read once at start-up from the entry's config table, so that a wrong key is a
one-line error naming the file, table and key before any client connects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ingest.settings import Table
from proxy.core.peers import MIN_SECRET_BYTES, PeerChannel
from proxy.core.settings import DatabaseSettings, DatabaseUpstream, database_upstream, parse_listen, string_list
from proxy.settings import ProxySettings

from .cancel import MAX_REPLICAS

DEFAULT_MAX_CLIENT_MESSAGE = 16 << 20
DEFAULT_MAX_SERVER_MESSAGE = 256 << 20


@dataclass(frozen=True)
class Replicas:
    """`replica_id`, `replicas` and `cancel_secret_file`: this proxy is one of several behind a load balancer.

    `peers[i]` is where replica i takes cancels (its client listener); every
    replica has the same list and the same secret, and its own `replica_id`.
    """

    replica_id: int
    peers: tuple[tuple[str, int], ...]
    channel: PeerChannel

    @classmethod
    def from_table(cls, t: Table) -> "Replicas | None":
        if "replica_id" not in t.raw and "replicas" not in t.raw:
            if t.secret("cancel_secret") is not None:
                raise t.error("cancel_secret_file", "needs replica_id and replicas")
            return None
        replica_id = t.int("replica_id")
        peers = tuple(parse_listen(t, address) for address in string_list(t, "replicas"))
        if not peers:
            raise t.error("replicas", "missing: the replicas' host:port, in replica id order")
        if len(peers) > MAX_REPLICAS:
            raise t.error("replicas", f"at most {MAX_REPLICAS} replicas")
        if replica_id >= len(peers):
            raise t.error("replica_id", f"{replica_id} is not an index of replicas ({len(peers)} listed)")
        secret = t.secret("cancel_secret")
        if secret is None:
            raise t.error("cancel_secret_file", "missing: the replicas' shared secret that authenticates forwarded cancels")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise t.error("cancel_secret_file", f"the secret must be at least {MIN_SECRET_BYTES} bytes "
                                                "(e.g. `openssl rand -hex 32`)")
        return cls(replica_id, peers, PeerChannel(secret.encode()))


@dataclass(frozen=True)
class PostgresSettings(DatabaseSettings):
    max_client_message: int
    max_server_message: int
    replicas: Replicas | None = None

    @classmethod
    def from_config(cls, proxy: ProxySettings, default_fail_open: bool = False) -> "PostgresSettings":
        t = proxy.table
        return cls(
            **DatabaseSettings.common(proxy, default_fail_open, _upstream(t, proxy.upstream)),
            max_client_message=t.int("max_message_bytes", DEFAULT_MAX_CLIENT_MESSAGE, minimum=1024),
            max_server_message=t.int("max_server_message_bytes", DEFAULT_MAX_SERVER_MESSAGE, minimum=1024),
            replicas=Replicas.from_table(t),
        )


def _upstream(t: Table, url: str) -> DatabaseUpstream:
    """postgresql://user@host:port/database; without a database, PostgreSQL's own default: the user's name."""
    upstream = database_upstream(t, url, ("postgresql", "postgres"), 5432)
    return replace(upstream, database=upstream.database or upstream.user)
