"""The HTTP/Kubernetes replay renderer on recorded records: request and response steps with JSON
pretty-printed and masked bodies as the client saw them, exec streams by channel name."""

from ingest.protocols import renderer
from ingest.protocols.http import records as rec


def test_request_response_and_exec_streams_read_as_steps():
    r = renderer("kubernetes")
    assert r is renderer("http")
    request = rec.request_record("GET", "/api/v1/namespaces/default/secrets/x", "1.1",
                                 [(b"Host", b"k"), (b"Authorization", b"Bearer t0ken")], operation="request",
                                 text="GET /api/v1/namespaces/default/secrets/x", objects=("secrets/x",),
                                 attributes={"verb": "get"})
    step = r.step("client", [request], max_rows=10, reveal=None)
    marker, head, detail = r.describe(step)
    assert (marker, head) == ("REQUEST", "GET /api/v1/namespaces/default/secrets/x")
    assert "Authorization: [REDACTED]" in detail and "t0ken" not in str(step)

    response = rec.response_record(200, b"OK", "1.1", [(b"Content-Type", b"application/json")])
    body = rec.data_record(b'{"kind":"Secret","data":{"password":"W01BU0tFRDpjb2x1bW5d"}}', sealed_original=b"x",
                           attributes={"masked": "column"})
    marker, head, detail = r.describe(r.step("server", [response, body], max_rows=10, reveal=None))
    assert (marker, head) == ("RESPONSE", "HTTP/1.1 200 OK")
    assert '"kind": "Secret"' in "\n".join(detail) and "masked: column" in detail
    revealed = r.step("server", [response, body], max_rows=10, reveal=lambda sealed: b'{"clear":1}')
    assert '"clear": 1' in revealed["body"]

    stdout = [rec.frame_record("ws.binary", b"hi\n", "1")]
    marker, head, detail = r.describe(r.step("server", stdout, max_rows=10, reveal=None))
    assert (marker, head, detail) == ("OUTPUT", "3 B", ["hi"])
    status = [rec.frame_record("ws.binary", b'{"metadata":{},"status":"Failure","message":"command terminated with '
                                            b'non-zero exit code","details":{"causes":[{"reason":"ExitCode",'
                                            b'"message":"2"}]}}', "3")]
    assert r.describe(r.step("server", status, max_rows=10, reveal=None))[:2] == (
        "STATUS", "Failure: command terminated with non-zero exit code (exit code 2)")
    control = [rec.frame_record("spdy.syn_stream", b"", "0"), rec.frame_record("spdy.window_update", b"", "0")]
    assert r.describe(r.step("client", control, max_rows=10, reveal=None)) == (
        "FRAMES", "spdy.syn_stream, spdy.window_update (0) (2)", [])


def test_a_protobuf_body_is_shown_as_what_it_is_not_as_mojibake():
    r = renderer("kubernetes")
    response = rec.response_record(200, b"OK", "1.1", [(b"Content-Type", b"application/vnd.kubernetes.protobuf")])
    encoded = b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret\x12\x05\n\x03\n\x01x"
    step = r.step("server", [response, rec.data_record(encoded)], max_rows=10, reveal=None)
    assert step["body"] == f"(Kubernetes protobuf, {len(encoded)} B, not decoded)"
