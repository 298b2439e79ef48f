from __future__ import annotations

import subprocess
import sys

import pytest

from custody.config import load_config
from custody.init import initialise
from ingest.errors import CustodyError
from ingest.settings import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "custody.toml"
    path.write_text(text)
    return path


def test_init_writes_a_config_that_loads_and_refuses_to_overwrite(tmp_path):
    config = load_config(initialise(tmp_path))
    assert config.kafka.embedded and config.kafka.topic("events") == "custody.events"
    assert config.proxies[0].name == "local-postgres" and config.proxies[0].protocol == "postgres"
    assert config.keys.keyring == tmp_path / "keys" / "keyring.toml"
    assert config.proxies[0].policy == tmp_path / "policies" / "default.toml" and config.proxies[0].policy.exists()
    assert oct((tmp_path / "keys" / "custodian.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(CustodyError, match="refusing to overwrite"):
        initialise(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("[ledger]\nsegment_max_events = 'lots'\n", r"\[ledger\] segment_max_events: expected an integer >= 1, got 'lots'"),
    ("[[proxy]]\nname = 'a'\nprotocol = 'ftp'\nlisten = 'x'\nupstream = 'y'\n", r"\[proxy.0\] protocol: expected one of postgres"),
    ("[[proxy]]\nname = 'a'\nprotocol = 'postgres'\nupstream = 'y'\n", r"\[proxy.0\] listen: missing \(required\)"),
    ("[[proxy]]\nname='a'\nprotocol='postgres'\nlisten='x'\nupstream='y'\nupstream_password='hunter2'\n",
     r"secrets are never inline; use upstream_password_file or upstream_password_env"),
    ("[spool]\nfail_open = 'yes'\n", r"\[spool\] fail_open: expected true or false"),
    ("[kafka\n", r"not valid TOML"),
])
def test_wrong_settings_are_one_line_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(write(tmp_path, text))
    assert "\n" not in str(error.value)


def test_secrets_come_from_env_or_file(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("s3cret\n")
    base = "[[proxy]]\nname='a'\nprotocol='postgres'\nlisten='x'\nupstream='y'\n"
    config = load_config(write(tmp_path, base + "upstream_password_file = 'pw'\n"))
    assert config.proxies[0].table.secret("upstream_password") == "s3cret"
    monkeypatch.setenv("PG_PW", "from-env")
    config = load_config(write(tmp_path, base + "upstream_password_env = 'PG_PW'\n"))
    assert config.proxies[0].table.secret("upstream_password") == "from-env"
    config = load_config(write(tmp_path, base + "upstream_password_env = 'NOT_SET_ANYWHERE'\n"))
    with pytest.raises(ConfigError, match="environment variable NOT_SET_ANYWHERE is not set"):
        config.proxies[0].table.secret("upstream_password")


def test_missing_config_is_one_line_from_the_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "custody", "keys", "list", "--config", str(tmp_path / "nope.toml")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no such config file" in result.stderr and "Traceback" not in result.stderr


def test_kafka_client_settings_pass_through_and_secrets_come_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KAFKA_PW", "broker-secret")
    config = load_config(write(tmp_path, "[kafka]\nbootstrap = 'k1:9092,k2:9092'\nsecurity_protocol = 'SASL_SSL'\n"
                                          "sasl_mechanism = 'SCRAM-SHA-512'\nsasl_plain_username = 'custody'\n"
                                          "sasl_plain_password_env = 'KAFKA_PW'\n"))
    options = config.kafka.client_options()
    assert options["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_plain_password"] == "broker-secret"
    assert "sasl_plain_password_env" not in options
    with pytest.raises(ConfigError, match="secrets are never inline"):
        load_config(write(tmp_path, "[kafka]\nsasl_plain_password = 'inline'\n"))
