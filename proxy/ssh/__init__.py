"""The SSH front end: asyncssh towards the client and towards the target, on the proxy core.

* `settings` — the SSH keys of a `[[proxy]]` entry (upstream URL, the
  credential the proxy holds, the pinned target host key, its own host key).
* `events` — what the glue feeds the core's `Session` (`Session.event`):
  a login, a channel's start (exec/shell/subsystem with its pty and env),
  channel data with its channel id, window changes, exits; and the SSH
  commands the front end yields for the glue to carry out.
* `frontend` — the protocol state machine: identity, recording of every
  channel both ways, exec/sftp/forward operations under policy.
* `server` — the asyncio glue around asyncssh (it owns its sockets, so the
  byte adapter `proxy.core.server` does not fit).
"""
