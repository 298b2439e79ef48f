"""The outcome of an exec or attach, read from what the cluster sends on its error channel (3).

kubectl learns a remote command's result from that channel, not from the
HTTP status (the `101` that opened the stream is not a final answer): in the
`v4`/`v5.channel.k8s.io` protocols and on SPDY's `error` stream it is a
`v1.Status` (`Success`, or `Failure` with reason `NonZeroExitCode` and the
exit code as the `ExitCode` cause); the older channel protocols send the
error's text alone. Recording it as the frame's outcome lets `activity`
show a failed `kubectl exec` as failed.
"""

from __future__ import annotations

import json

ERROR_CHANNEL = "3"


def exec_outcome(data: bytes) -> dict[str, str]:
    """`outcome`, `error_code` (the exit code, or the Status reason) and `error_message` of an error-channel
    message; nothing for an empty one."""
    if not data.strip():
        return {}
    try:
        status = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        status = None
    if not isinstance(status, dict) or "status" not in status:
        return {"outcome": "error", "error_code": "Error", "error_message": data.decode("utf-8", "replace")}
    if status["status"] == "Success":
        return {"outcome": "ok"}
    causes = (status.get("details") or {}).get("causes") or []
    exit_code = next((c.get("message") for c in causes if isinstance(c, dict) and c.get("reason") == "ExitCode"),
                     None)
    return {"outcome": "error", "error_code": str(exit_code or status.get("reason") or "Failure"),
            "error_message": str(status.get("message") or "")}
