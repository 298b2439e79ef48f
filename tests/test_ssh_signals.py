"""Signals, environment and exit signals through the SSH proxy: asyncssh as the client (it sends `signal`
requests and env), the real ssh with a PTY for Ctrl-C; each recorded on its channel as it happened.
"""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess
import time

import asyncssh

from pg_fixtures import messages
from ssh_fixtures import new_user
from test_ssh_forwarding import echo, proxy, session_of, sshd  # noqa: F401 (the module's fixtures)


async def _exercise(proxy, user: str) -> dict:
    host, port = proxy.address(1)
    host_key = asyncssh.import_public_key(proxy.client.known_hosts.read_text().split(None, 1)[1])
    async with asyncssh.connect(host, port, username=user, password=proxy.token(user, ("dev",)),
                                known_hosts=([host_key], [], []), client_keys=None, agent_path=None,
                                config=None, preferred_auth="password") as conn:
        env = await conn.run("echo value=$CUSTODY_COLOUR", env={"CUSTODY_COLOUR": "teal"}, check=False)
        # sshd refuses signals to a root session ("session signalling requires privilege separation"): the request
        # is relayed, and the target's refusal is its own.
        chan, session = await conn.create_session(asyncssh.SSHClientSession, "sleep 1; echo finished")
        await asyncio.sleep(0.3)
        chan.send_signal("INT")
        await asyncio.wait_for(chan.wait_closed(), 20)
        killed = await conn.run("kill -TERM $$", check=False)
        return {"env": env, "signalled": chan.get_exit_status(), "killed": killed}


def test_env_signal_and_exit_signal_are_relayed_and_recorded(proxy, sshd):
    user = new_user()
    ran = asyncio.run(_exercise(proxy, user))
    assert ran["env"].stdout == "value=teal\n" and ran["env"].exit_status == 0
    assert ran["signalled"] == 0
    assert "session_signal_req" in (sshd.directory / "sshd.log").read_text()  # the signal reached the target
    assert ran["killed"].exit_signal[0] == "TERM", ran["killed"]
    events = session_of(proxy, user)
    client, server = messages(events, "client"), messages(events, "server")
    execs = {m["text"]: m["channel"] for m in client if m["type"] == "exec"}
    assert [(m["channel"], m["attributes"]) for m in client if m["type"] == "env"] == [
        (execs["echo value=$CUSTODY_COLOUR"], {"name": "CUSTODY_COLOUR", "value": "teal"})]
    assert [(m["channel"], m["attributes"]["signal"]) for m in client if m["type"] == "signal"] == [
        (execs["sleep 1; echo finished"], "INT")]
    signals = [(m["channel"], m["attributes"]["signal"], m["outcome"], m["error_code"]) for m in server
               if m["type"] == "exit-signal"]
    assert signals == [(execs["kill -TERM $$"], "TERM", "error", "TERM")]


def test_ctrl_c_in_a_pty_reaches_the_target_and_is_recorded(proxy):
    user = new_user()
    master, slave = pty.openpty()
    ssh = subprocess.Popen(["ssh", *proxy.client.options(), "-tt", "-p", str(proxy.client.port), "-l", user,
                            proxy.client.host, "echo started; sleep 30; echo not-interrupted"],
                           stdin=slave, stdout=slave, stderr=slave, env=proxy.client.env(proxy.token(user, ("dev",))),
                           start_new_session=True)
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 20
    while b"started" not in seen:
        assert time.monotonic() < deadline, seen
        seen += os.read(master, 4096)
    time.sleep(0.3)
    os.write(master, b"\x03")
    assert ssh.wait(20) != 0
    os.close(master)
    events = session_of(proxy, user)
    client, server = messages(events, "client"), messages(events, "server")
    assert b"\x03" in b"".join(m["data"] for m in client if m["type"] == "data")
    assert not any(b"not-interrupted" in m["data"] for m in server)
    ending = [(m["type"], m["attributes"]) for m in server if m["type"] in ("exit-signal", "exit-status")]
    assert ending in ([("exit-signal", {"signal": "INT", "core_dumped": "false"})],
                      [("exit-status", {"status": "130"})]), ending
