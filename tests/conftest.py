"""Shared fixtures: a real Kafka-protocol broker, keys, and settings pointing at them."""

from __future__ import annotations

import uuid

import pytest
from nacl.signing import SigningKey

from ingest import kafka
from ingest.broker import DevBroker
from ingest.keys import Keyring, PrivateKey, TrustedKey, key_id_for
from ingest.settings import KafkaSettings


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> DevBroker:
    """One dev broker for the whole run; tests isolate themselves with their own topic prefix."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with DevBroker(log_path=log) as b:
        yield b


@pytest.fixture
def kafka_settings(broker) -> KafkaSettings:
    """Settings with a topic prefix of this test's own."""
    return KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
                         embedded_listen=broker.bootstrap, partitions=3)


def make_key(name: str = "proxy") -> PrivateKey:
    signing_key = SigningKey.generate()
    return PrivateKey(key_id_for(name, bytes(signing_key.verify_key)), signing_key)


@pytest.fixture
def proxy_key() -> PrivateKey:
    return make_key("proxy")


@pytest.fixture
def keyring(proxy_key) -> Keyring:
    return Keyring([TrustedKey(proxy_key.key_id, "proxy", proxy_key.public_key)])


def send_raw(settings: KafkaSettings, items: list[tuple[bytes, bytes]]) -> None:
    """Put (key, value) messages on the events topic as they are: tests forge and tamper with them."""
    kafka.ensure_topics(settings, ("events",))
    producer = kafka.producer(settings)
    for key, value in items:
        producer.send(settings.topic("events"), key=key, value=value)
    producer.flush()
    producer.close()
