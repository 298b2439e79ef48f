"""`custody up`: the whole stack from one config, as supervised child processes.

The dev broker (when `[kafka] bootstrap = "embedded"`), one witness (when its
key exists: `custody init` makes one), the syslog sink (when `[soc] syslog` names
a receiver: `custody violations forward`), the ledger and the proxies each run in
their own process, so that sealing never competes with a
proxy's relay for the interpreter lock. Their output is prefixed with their
name. Ctrl-C stops them in the order that loses nothing: proxies first (they
end sessions and drain their spools), then the ledger (it seals what it read),
then the syslog sink (what it has not confirmed it sends again next time), then
the broker.

Stopping is bounded (`STOP_BOUNDS`, `stop_bound()`): each child gets SIGTERM and
its time; a proxy that overruns is killed alone, so that its recorder process
still spools what it holds (within `ingest.recorder.ORPHAN_BOUND`), and then
whatever is left of a child's process group is killed. The children die with
the supervisor however it dies, SIGKILL included (`custody.lifeline`), within
the same bounds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import click

from custody.config import Config, config_option, load_config
from custody.lifeline import Lifeline
from ingest.recorder import ORPHAN_BOUND
from ingest.errors import CustodyError

COLOURS = {"broker": "blue", "witness": "green", "syslog": "yellow", "ledger": "magenta", "proxy": "cyan"}

# Seconds each child has to stop after SIGTERM (from `custody up` stopping, or on its own once the supervisor is
# gone) before it is killed. The ledger is crash-safe and the dev broker keeps nothing, so killing them loses nothing;
# a killed proxy's recorder still has ORPHAN_BOUND seconds to spool what it holds.
STOP_BOUNDS = {"proxy": 10.0, "ledger": 10.0, "syslog": 5.0, "witness": 5.0, "broker": 5.0}
GROUP_GRACE = 2.0  # for what a child leaves behind in its process group (Tansu) after it exited


def stop_bound() -> float:
    """The longest `custody up` takes to stop: every child's bound, a proxy's recorder's and the grace periods."""
    return sum(STOP_BOUNDS.values()) + ORPHAN_BOUND + GROUP_GRACE * len(STOP_BOUNDS)


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    pump: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        prefix = click.style(f"{self.name:>6} |", fg=COLOURS.get(self.name))
        for line in self.process.stdout:
            click.echo(f"{prefix} {line.rstrip()}", err=True)


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for_port(address: str, child: Child, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _port_open(address):
        if child.process.poll() is not None:
            raise CustodyError(f"{child.name} exited with code {child.process.returncode} before listening on {address}")
        if time.monotonic() > deadline:
            raise CustodyError(f"{child.name} did not listen on {address} within {timeout:.0f}s")
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _reap_group(pgid: int, grace: float) -> None:
    """Give the rest of process group `pgid` `grace` seconds to end, then kill it."""
    deadline = time.monotonic() + grace
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(0.05)


class Stack:
    """Start, watch and stop the children for one config."""

    def __init__(self, config: Config, debug: bool = False):
        self.config, self.debug = config, debug
        self.children: list[Child] = []
        self.lifeline = Lifeline()

    def _spawn(self, name: str, args: list[str]) -> Child:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.lifeline.child_env(STOP_BOUNDS[name])}
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   text=True, env=env, start_new_session=True, pass_fds=self.lifeline.pass_fds)
        child = Child(name, process)
        self.children.append(child)
        return child

    def _custody(self, name: str, *args: str) -> Child:
        debug = ["--debug"] if self.debug else []
        return self._spawn(name, [sys.executable, "-m", "custody", *debug, *args, "--config", str(self.config.path)])

    def start(self) -> None:
        kafka = self.config.kafka
        if kafka.embedded:
            if _port_open(kafka.embedded_listen):
                raise CustodyError(f"{kafka.embedded_listen} is in use: is another `custody up` running?")
            broker = self._custody("broker", "broker")
            wait_for_port(kafka.embedded_listen, broker)
            from ingest.kafka import ensure_topics

            ensure_topics(kafka)
        witness = self.config.witness
        if witness is not None and os.path.exists(witness.key):  # one witness in development (`custody init` keys)
            child = self._custody("witness", "witness")
            if witness.listen and not witness.listen.endswith(":0"):
                wait_for_port(witness.listen, child)
        if self.config.soc.syslog:  # a consumer group of its own: a receiver that is down never holds up sealing
            self._custody("syslog", "violations", "forward")
        self._custody("ledger", "ledger")
        if self.config.proxies:
            proxy = self._custody("proxy", "proxy")
            for settings in self.config.proxies:
                wait_for_port(settings.listen, proxy)

    def failed(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self) -> None:
        """Stop every child, newest first, within `stop_bound()` seconds in all."""
        for child in reversed(self.children):
            process = child.process
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # the child alone: it stops its own children (Tansu, recorder)
                try:
                    process.wait(STOP_BOUNDS[child.name])
                except subprocess.TimeoutExpired:
                    click.echo(f"custody up: {child.name} did not stop within {STOP_BOUNDS[child.name]:.0f}s; killing it",
                               err=True)
                    process.kill()
                    process.wait()
            # What is left of its process group: a recorder still spooling, a Tansu its broker could not stop.
            _reap_group(process.pid, ORPHAN_BOUND if child.name == "proxy" else GROUP_GRACE)
            child.pump.join(timeout=2)
        self.lifeline.close()

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@click.command()
@config_option
@click.pass_context
def up(ctx: click.Context, config_path: str | None) -> None:
    """Run the stack of the config (dev broker, ledger, proxies) until Ctrl-C or SIGTERM.

    Stopping takes at most {bound:.0f} s: proxies first ({proxy:.0f} s; a proxy's recorder then has
    {recorder:.0f} s more to spool what it holds), the ledger ({ledger:.0f} s, it seals what it read), the syslog
    sink when [soc] syslog is set ({syslog:.0f} s), the witness ({witness:.0f} s), the broker ({broker:.0f} s); what is still running after its time is killed. If `custody up` itself dies, even by
    SIGKILL, its children stop on their own within the same bounds.
    """
    config = load_config(config_path)
    stack = Stack(config, debug=bool(ctx.find_root().obj and ctx.find_root().obj.get("debug")))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with stack:
        for p in config.proxies:
            click.echo(f"custody up: {p.name} ({p.protocol}) on {p.listen}; ledger in {config.ledger.dir}; Ctrl-C stops",
                       err=True)
        try:
            while not stopping.wait(0.5):
                if (dead := stack.failed()) is not None:
                    raise CustodyError(f"{dead.name} exited with code {dead.process.returncode}; stopping the stack")
        except KeyboardInterrupt:
            click.echo("custody up: stopping (proxies, then ledger, then broker)", err=True)


up.help = up.help.format(bound=stop_bound(), recorder=ORPHAN_BOUND, **STOP_BOUNDS)
