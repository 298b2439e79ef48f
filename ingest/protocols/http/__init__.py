"""HTTP/1.1 as recorded by the HTTP and Kubernetes front ends: `records` builds the `Message` records
(request and response heads, body chunks, tunnelled WebSocket / SPDY frames per channel), `render`
shows them in a replay. The wire codec itself is h11 (and wsproto, and `..kubernetes.spdy`).
"""
