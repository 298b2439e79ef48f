"""Kubernetes API awareness, sans-I/O: what a request means (`requestinfo`), the exec/attach/port-forward
stream channels (`channels`), and the SPDY/3.1 framing codec older kubectl speaks for them (`spdy`).

Shared by the proxy (which decides and records) and query (which replays), like every codec here.
"""
