"""A `kubectl exec`'s outcome, read from the Status the cluster sends on the error channel (3).

The 101 that opens an exec's stream is not a final answer, so without this
`activity` showed no outcome for any exec, failed or not. Sans-I/O: the
tunnels are fed the frames a cluster sends, in both transports.
"""

from __future__ import annotations

import json

import pytest
from wsproto.frame_protocol import FrameProtocol

from ingest.protocols.kubernetes import spdy
from ingest.protocols.kubernetes.status import exec_outcome
from proxy.http.tunnels import SpdyTunnel, WebSocketTunnel

SUCCESS = json.dumps({"metadata": {}, "status": "Success"}).encode()
EXIT_3 = json.dumps({
    "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
    "message": "command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3",
    "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}}).encode()
NOT_FOUND = json.dumps({"metadata": {}, "status": "Failure", "reason": "InternalError",
                        "message": 'exec: "nope": executable file not found in $PATH'}).encode()


@pytest.mark.parametrize("data, expected", [
    (SUCCESS, {"outcome": "ok"}),
    (EXIT_3, {"outcome": "error", "error_code": "3", "error_message": json.loads(EXIT_3)["message"]}),
    (NOT_FOUND, {"outcome": "error", "error_code": "InternalError",
                 "error_message": 'exec: "nope": executable file not found in $PATH'}),
    (b"error executing command: exit status 2", {"outcome": "error", "error_code": "Error",  # v1-v3: text only
                                                "error_message": "error executing command: exit status 2"}),
    (b"", {}),
])
def test_error_channel_messages_give_the_command_outcome(data, expected):
    assert exec_outcome(data) == expected


def _server_ws_message(channel: int, data: bytes) -> bytes:
    return FrameProtocol(client=False, extensions=[]).send_data(bytes([channel]) + data, fin=True)


def test_a_websocket_exec_records_its_exit_on_the_error_channel_only():
    tunnel = WebSocketTunnel("v5.channel.k8s.io", 1 << 20)
    records, relayed = tunnel.server(_server_ws_message(1, b"out\n") + _server_ws_message(3, EXIT_3))
    assert relayed == _server_ws_message(1, b"out\n") + _server_ws_message(3, EXIT_3)  # unchanged
    stdout, status = records
    assert stdout["channel"] == "1" and "outcome" not in stdout
    assert (status["channel"], status["data"], status["outcome"], status["error_code"]) == ("3", EXIT_3, "error", "3")


def test_a_port_forward_channel_3_is_a_port_not_a_command():
    records, _ = WebSocketTunnel("portforward.k8s.io", 1 << 20).server(
        _server_ws_message(3, SUCCESS))
    assert records[0]["channel"] == "3" and "outcome" not in records[0]


def test_what_the_client_sends_on_channel_3_is_no_outcome():
    message = FrameProtocol(client=True, extensions=[]).send_data(b"\x03" + SUCCESS, fin=True)
    records, _ = WebSocketTunnel("v5.channel.k8s.io", 1 << 20).client(message)
    assert "outcome" not in records[0]


def test_a_spdy_exec_records_its_exit_on_the_error_stream():
    client, server = spdy.FrameWriter(), spdy.FrameWriter()
    tunnel = SpdyTunnel(1 << 20)
    tunnel.client(client.syn_stream(1, [("streamtype", "error")]) + client.syn_stream(3, [("streamtype", "stdout")]))
    records, _ = tunnel.server(server.data(3, b"out\n") + server.data(1, SUCCESS, fin=True))
    stdout, status = records
    assert stdout["channel"] == "1" and "outcome" not in stdout
    assert (status["channel"], status["outcome"]) == ("3", "ok")
