"""`custody up`: the whole stack from one config, as supervised child processes.

The dev broker (when `[kafka] bootstrap = "embedded"`), the ledger and the
proxies each run in their own process, so that sealing never competes with a
proxy's relay for the interpreter lock. Their output is prefixed with their
name. Ctrl-C stops them in the order that loses nothing: proxies first (they
end sessions and drain their spools), then the ledger (it seals what it read),
then the broker.
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
from ingest.errors import CustodyError

COLOURS = {"broker": "blue", "ledger": "magenta", "proxy": "cyan"}


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


class Stack:
    """Start, watch and stop the children for one config."""

    def __init__(self, config: Config, debug: bool = False):
        self.config, self.debug = config, debug
        self.children: list[Child] = []

    def _spawn(self, name: str, args: list[str]) -> Child:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   text=True, env=env, start_new_session=True)
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
        self._custody("ledger", "ledger")
        if self.config.proxies:
            proxy = self._custody("proxy", "proxy")
            for settings in self.config.proxies:
                wait_for_port(settings.listen, proxy)

    def failed(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self, timeout: float = 20.0) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                os.killpg(child.process.pid, signal.SIGTERM)  # the child's whole group: the broker's Tansu too
                try:
                    child.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
            child.pump.join(timeout=2)

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
    """Run the stack of the config (dev broker, ledger, proxies) until Ctrl-C."""
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
