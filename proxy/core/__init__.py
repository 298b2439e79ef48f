"""The protocol-neutral proxy core every front end stands on.

* `commands` — what a session asks its adapter to do (send, open the
  upstream, start TLS, verify a token, await an approval, set a timer,
  close); blocking ones pause the handler that yielded them.
* `session` — one connection as a sans-I/O state machine: lanes, identity
  binding, backlog until SessionStart, recording with fail closed/open,
  policy and holds, the startup deadline, counters, a single end.
* `frontend` — what a protocol brings: a listener-wide `Protocol` and a
  per-connection `FrontEnd` whose handlers yield commands.
* `server` — the one asyncio adapter that carries out commands.
* `registry` — `[[proxy]] protocol = "..."` to its front end.
* `records`, `policy`, `settings` — the neutral event bodies, the per-session
  policy gate, the neutral `[[proxy]]` keys.
"""
