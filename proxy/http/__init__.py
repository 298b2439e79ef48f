"""The HTTP/1.1 and Kubernetes API front ends on the proxy core (`protocol = "http"` / `"kubernetes"`).

`frontend` is the state machine (h11 on both sides: the proxy is an HTTP server to its client and an
HTTP client to the target; WebSocket and SPDY/3.1 tunnels after a 101), `settings` its `[[proxy]]`
keys, `masking` the JSON response masking.
"""
