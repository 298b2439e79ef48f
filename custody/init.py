"""`custody init`: a working starter directory — config, keys, a dev identity provider.

Everything it writes is for local use on embedded defaults; the config says
which parts to replace for production (the dev IdP above all).
"""

from __future__ import annotations

import base64
import os
from importlib import resources
from pathlib import Path

import click
from nacl.public import PrivateKey as BoxPrivateKey

from ingest.errors import CustodyError
from ingest.keys import PrivateKey, add_to_keyring, generate_key_file

CONFIG_TEMPLATE = """\
# Custody configuration, written by `custody init`. Paths are relative to this file.
# Secrets are never inline: use *_file or *_env settings.

[kafka]
bootstrap = "embedded"            # the dev broker (Tansu, memory storage); production: "host:9092,host:9092"
embedded_listen = "127.0.0.1:{broker_port}"
topic_prefix = "custody."

[keys]
proxy_key = "keys/proxy.key"
ledger_key = "keys/ledger.key"
exporter_key = "keys/exporter.key"
keyring = "keys/keyring.toml"
custodian_public_key = "keys/custodian.pub"   # its private half (keys/custodian.key) belongs offline, with the evidence custodian

[identity]
# DEV ONLY: a local identity provider created by `custody init`. Point issuer/jwks at your real IdP in production.
issuer = "https://dev-idp.custody.invalid/"
audience = "custody"
jwks = "keys/dev-idp.jwks.json"
username_claim = "sub"
groups_claim = "groups"
dev_signing_key = "keys/dev-idp.key"
# leeway_seconds = 30                # clock skew allowed on exp/nbf; a session also ends this long after its token's exp
# end_sessions_on_expiry = true      # false: sessions outlive their tokens

[ledger]
dir = "ledger"
origin = "{origin}"   # this ledger's name in its checkpoints, unique (from the ledger key's id); production: your domain
segment_max_events = 100000
segment_max_seconds = 5
idle_seal_seconds = 60

[witness]
key = "keys/witness.key"       # its own key (keyring role witness); production: on other hosts, run by other parties
listen = "127.0.0.1:{witness_port}"    # C2SP tlog-witness add-checkpoint (custody.seals feeds it too)
state_dir = "witness"

[spool]
dir = "spool"
max_bytes = 1073741824
fail_open = false

# [cpus]          # Linux, a host of few cores: the proxy's relay and its recorder on CPUs of their own
# relay = "0"     # (the recorder takes the others; README, Production notes)

[[proxy]]
name = "local-postgres"
protocol = "postgres"
listen = "127.0.0.1:{proxy_port}"
upstream = "postgresql://postgres@127.0.0.1:5432/postgres"
policy = "policies/default.toml"                  # reloaded on change; see `custody policy test`
# upstream_password_env = "CUSTODY_PG_PASSWORD"   # or upstream_password_file; absent = trust
# upstream_tls = "verify-full"     # disable | require | verify-ca | verify-full (libpq sslmode meanings);
#                                  # default verify-full, but disable for a loopback target like this one
# upstream_ca = "certs/db-ca.pem"  # the CA of the target's certificate (default: the system's trust store)
# upstream_client_cert = "certs/proxy.crt"   # with upstream_client_key: when the target wants a client certificate
# upstream_client_key = "certs/proxy.key"
# databases = ["app", "analytics"] # the client's database may pick one of these; the upstream URL's is the default

# An SSH target: clients log in with their OIDC token as the password, for the user named in the token.
# [[proxy]]
# name = "bastion"
# protocol = "ssh"
# listen = "127.0.0.1:2222"
# upstream = "ssh://deploy@10.0.0.5:22"            # as whom the proxy logs in to the target
# upstream_key_file = "keys/deploy_ed25519"        # or upstream_password_file / upstream_password_env
# upstream_host_key = "ssh-ed25519 AAAA..."        # the target's host key, pinned (ssh-keyscan, then check it)
# host_key_file = "keys/ssh_host_ed25519"          # the proxy's own host key, written by `custody init`
# user_ca_key_file = "keys/ssh_user_ca"            # signs `custody ssh-login` certificates (plain `ssh` then works)
# policy = "policies/default.toml"
# [[proxy.authorized_key]]                         # optional, repeated: a key logs in as an identity (CI, no OIDC)
# key = "ssh-ed25519 AAAA... ci@runner"            # or key_file = "keys/ci_runner.pub"
# username = "ci-runner"                           # the SSH user it must log in as
# groups = ["ci"]                                  # what policy sees
# expires = 2027-01-01T00:00:00Z                   # optional; absent = until the entry is removed

# The machine's MariaDB/MySQL: clients send their OIDC token as the password (the proxy switches them to
# mysql_clear_password, taken only over TLS or from loopback): `mariadb -h 127.0.0.1 -P 3307 -u alice@example.com -p`,
# PyMySQL as is, mysql-connector with auth_plugin="mysql_clear_password" (it wants TLS: set tls_cert/tls_key).
# [[proxy]]
# name = "local-mysql"
# protocol = "mysql"
# listen = "127.0.0.1:3307"
# upstream = "mysql://root@127.0.0.1:3306/mysql"   # as whom the proxy logs in, and the default schema
# policy = "policies/default.toml"
# upstream_password_env = "CUSTODY_MYSQL_PASSWORD" # or upstream_password_file; absent = no password
# tls_cert = "certs/proxy.crt"                      # with tls_key (and client_ca): TLS from clients (SSL request)
# tls_key = "certs/proxy.key"
# upstream_tls = "verify-full"                      # as for PostgreSQL; default disable for a loopback target
# databases = ["shop"]                              # the client's schema (handshake, COM_INIT_DB) may pick these
"""


def write_custodian_keypair(directory: Path) -> None:
    """The X25519 key pair that masked originals are sealed to (ingest.sealing)."""
    private = BoxPrivateKey.generate()
    fd = os.open(directory / "custodian.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(base64.b64encode(bytes(private)).decode() + "\n")
    (directory / "custodian.pub").write_text(base64.b64encode(bytes(private.public_key)).decode() + "\n")


def write_ssh_host_key(path: Path, comment: str = "custody ssh proxy") -> None:
    """The SSH proxy's own host key, or its user CA (OpenSSH format, mode 0600), and the .pub beside it."""
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.export_private_key())
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key())


def ledger_origin(ledger_key: PrivateKey) -> str:
    """A checkpoint origin no other deployment has: the hash part of the ledger key's id (`ledger+<16 hex>`).

    C2SP tlog-checkpoint origins are schema-less URLs without spaces or '+', which the key id's hex part keeps.
    """
    return f"custody.example/ledger/{ledger_key.key_id.rpartition('+')[2]}"


def initialise(directory: Path, proxy_port: int = 6432, broker_port: int = 9192) -> Path:
    """Create the starter directory; refuses to touch one that already has a config."""
    from proxy.devidp import create_dev_idp

    config = directory / "custody.toml"
    if config.exists():
        raise CustodyError(f"{config} already exists; refusing to overwrite (use another directory)")
    keys = directory / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    generated = {}
    for role in ("proxy", "ledger", "exporter", "witness"):
        generated[role] = generate_key_file(keys / f"{role}.key", role)
        add_to_keyring(keys / "keyring.toml", generated[role], role)
    write_custodian_keypair(keys)
    create_dev_idp(keys / "dev-idp.key", keys / "dev-idp.jwks.json")
    write_ssh_host_key(keys / "ssh_host_ed25519")
    write_ssh_host_key(keys / "ssh_user_ca", "custody ssh user CA")
    policies = directory / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "default.toml").write_text(resources.files("proxy").joinpath("policies/default.toml").read_text())
    config.write_text(CONFIG_TEMPLATE.format(proxy_port=proxy_port, broker_port=broker_port,
                                             witness_port=9380 if broker_port == 9192 else 0,  # 0: any free port
                                             origin=ledger_origin(generated["ledger"])))
    return config


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--proxy-port", type=int, default=6432, show_default=True, help="Where the PostgreSQL proxy listens.")
@click.option("--broker-port", type=int, default=9192, show_default=True, help="Where the dev broker listens.")
def init(directory: Path, proxy_port: int, broker_port: int) -> None:
    """Write a starter custody.toml, keys and a dev identity provider into DIRECTORY."""
    config = initialise(directory, proxy_port, broker_port)
    click.echo(f"wrote {config}, policies/default.toml and keys/ (proxy, ledger, exporter, custodian, dev IdP)")
    click.echo(f"next: cd {directory} && custody up")
