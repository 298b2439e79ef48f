"""`custody proxy`: every configured `[[proxy]]` in one process, one recorder for all.

One process holds one `Recorder` (one bounded queue, one signing thread, one
spool and producer): the spool is a single append-only log, and one recorder
keeps every session's events in order. `ProxyService` is what the CLI runs
and what the tests start in a background thread.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import threading
from dataclasses import dataclass

from nacl.public import PublicKey

from ingest.errors import CustodyError
from ingest.heap import freeze_startup_heap
from ingest.keys import PrivateKey, load_key_file
from ingest.recorder import Pressure, Recorder, RecorderUnavailable, SpoolOptions
from ingest.settings import ConfigError
from proxy.approvals_gateway import ApprovalGateway
from proxy.identity import TokenVerifier
from proxy.core.policy import PolicyRuntime
from proxy.core.registry import FRONT_ENDS, protocol_for
from proxy.policy import PolicyHolder
from proxy.settings import CpuSettings, ProxySettings, ServiceConfig, available_cpus

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 10_000


@dataclass(frozen=True)
class ServiceOptions:
    max_queue: int = DEFAULT_MAX_QUEUE
    producer_name: str | None = None
    recorder_cpus: frozenset[int] | None = None  # where the recorder process runs (`pin_relay` says); None: where this one may


def pin_relay(cpus: CpuSettings) -> frozenset[int] | None:
    """Put this process on `[cpus] relay` and return the recorder's CPUs (`CpuSettings.placement`). Call it before
    any thread starts: on Linux a thread's CPUs are its own, and the threads started later inherit them."""
    if cpus.relay is None and cpus.recorder is None:
        return None
    available = available_cpus()
    if available is None:
        raise ConfigError(f"{cpus.source}: [cpus]: placing processes on CPUs needs Linux (sched_setaffinity); "
                          "remove [cpus]")
    relay, recorder = cpus.placement(available)
    if relay is not None:
        os.sched_setaffinity(0, relay)
    return recorder


class ProxyService:
    """The recorder and the listeners of one config."""

    def __init__(self, config: ServiceConfig, options: ServiceOptions = ServiceOptions()) -> None:
        served = [p for p in config.proxies if p.protocol in FRONT_ENDS]
        other = [f"{p.name} ({p.protocol})" for p in config.proxies if p.protocol not in FRONT_ENDS]
        if other:
            log.warning("proxies %s: no front end for their protocol yet; skipped", ", ".join(other))
        if not served:
            raise ConfigError(f"{config.path}: no [[proxy]] with a protocol that has a front end "
                              f"({', '.join(sorted(FRONT_ENDS))}) to serve")
        self.config = config
        protocols = [protocol_for(p, config.spool.fail_open) for p in served]
        self.verifier = token_verifier(config)
        spool = SpoolOptions(config.spool.dir, config.spool.max_bytes, config.spool.fsync_interval_ms / 1000)
        name = options.producer_name or f"{socket.gethostname()}/proxy"
        key = load_key_file(config.keys.proxy_key)
        self.recorder = Recorder(config.kafka, spool, key, name, max_queue=options.max_queue, cpus=options.recorder_cpus)
        policies = [policy_runtime(config, p, key) for p in served]
        self.approvals = ApprovalGateway(config.kafka, self.verifier, key) if any(policies) else None
        identity = config.identity
        assert identity is not None  # token_verifier refused a config without [identity]
        leeway = identity.leeway_seconds if identity.end_sessions_on_expiry else None
        self.proxies = [protocol.make_listener(self.verifier, self.recorder, policy, self.approvals, leeway)
                        for protocol, policy in zip(protocols, policies)]
        custodian = custodian_key(config)  # input redaction seals what clients send to it, policy or not
        for listener in self.proxies:
            listener.custodian_key = custodian

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:  # no listening before the recorder can record: what was relayed meanwhile could be lost
            await loop.run_in_executor(None, self.recorder.wait_ready)
        except RecorderUnavailable as exc:
            raise CustodyError(f"cannot record: {exc}") from None
        self.recorder.on_pressure(lambda level: loop.call_soon_threadsafe(self._throttle, level))
        for proxy in self.proxies:
            try:
                await proxy.start()
            except OSError as exc:
                raise CustodyError(f"proxy {proxy.settings.name}: cannot listen on "
                                   f"{proxy.settings.listen_host}:{proxy.settings.listen_port}: {exc.strerror}") from None
        freeze_startup_heap()

    def _throttle(self, level: Pressure) -> None:
        """The recorder is behind: the sessions it is behind on wait until it catches up (load slows, never ends)."""
        for proxy in self.proxies:
            proxy.throttle(level)

    async def stop(self) -> None:
        for proxy in self.proxies:
            await proxy.stop()

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what was recorded (within `timeout`), then stop the recorder."""
        if self.approvals is not None:
            self.approvals.close()
        self.recorder.flush(timeout)
        self.recorder.close(timeout)
        log.info("recorder: %s", self.recorder.stats)

    async def serve_forever(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


def token_verifier(config: ServiceConfig) -> TokenVerifier:
    """The verifier for callers' (and reviewers') tokens, from [identity]."""
    if config.identity is None:
        raise ConfigError(f"{config.path}: [identity] is required: callers are identified by OIDC token")
    identity = config.identity
    return TokenVerifier(issuer=identity.issuer, audience=identity.audience, jwks=identity.jwks,
                         username_claim=identity.username_claim, groups_claim=identity.groups_claim,
                         leeway=identity.leeway_seconds)


def custodian_key(config: ServiceConfig) -> PublicKey | None:
    """The custodian's public key (`custody init` writes it), or None when it cannot be read (logged: input
    redaction then keeps no originals; a proxy with a policy refuses to start without it, see `policy_runtime`)."""
    path = config.keys.custodian_public_key
    try:
        return PublicKey(base64.b64decode(path.read_text(encoding="utf-8").strip(), validate=True))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("[keys] custodian_public_key %s unusable (%s): redacted client secrets are dropped, not sealed",
                    path, exc)
        return None


def policy_runtime(config: ServiceConfig, proxy: ProxySettings, key: PrivateKey) -> PolicyRuntime | None:
    """The proxy's policy file, and the custodian key that its masks need (required with any policy).

    Required even while the policy has no [[mask]]: a reload may add one, and
    the originals it hides must then be sealed, not lost or kept in clear.
    """
    if proxy.policy is None:
        return None
    path = config.keys.custodian_public_key
    try:
        custodian = PublicKey(base64.b64decode(path.read_text(encoding="utf-8").strip(), validate=True))
    except OSError as exc:
        raise ConfigError(f"{config.path}: [keys] custodian_public_key: cannot read {path}: {exc.strerror} "
                          f"(proxy {proxy.name!r} has a policy, and masked originals are sealed to this key)") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{config.path}: [keys] custodian_public_key: {path} is not a base64 "
                          f"X25519 public key: {exc}") from None
    return PolicyRuntime(PolicyHolder(proxy.policy), custodian, key.key_id)


class BackgroundService:
    """A `ProxyService` on its own event loop in a thread: for tests and benchmarks."""

    def __init__(self, config: ServiceConfig, options: ServiceOptions = ServiceOptions()) -> None:
        self.service = ProxyService(config, options)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="custody-proxy", daemon=True)

    def __enter__(self) -> "BackgroundService":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def address(self, index: int = 0) -> tuple[str, int]:
        return self.service.proxies[index].address

    def call(self, function, *args):
        """Run `function(*args)` on the proxy's loop and return its result (inspection in tests)."""
        async def run():
            return function(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self, timeout: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.service.close(timeout)
