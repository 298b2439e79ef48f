"""SSH's codecs and replay renderer, shared by the proxy (which relays SSH) and query (which replays it).

* `sftp` — the SFTP protocol (draft-ietf-secsh-filexfer-02, version 3, as
  OpenSSH speaks it), sans-I/O: framing, request and response decoding,
  status replies, and the `Transfers` that follow handles to paths and hash
  the file bytes that go through.
* `terminal` — the lines typed into an interactive shell, rebuilt from the
  keystrokes (best effort), so that each can be decided at its Enter.
* `screen`, `player` — the terminal as it looked (an xterm-subset emulator)
  and the HTML replay's script-free player of its frames.
* `render` — how recorded SSH messages read in a replay, and the asciicast
  v2 export of a terminal session.
"""
