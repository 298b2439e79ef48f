"""Masking detected values in what a terminal shows, without touching its escape sequences.

A PTY channel's output is text for a person, interleaved with control: CSI
sequences (cursor, colours, erase), OSC (titles, hyperlinks), other ESC
sequences. Only the text between them, and the text of an OSC (a window
title, a hyperlink), is given to the policy's detectors
(`Scanner.mask_bytes`, the same as for result rows); every escape sequence is
passed on byte for byte, so no sequence can be cut, merged or rewritten, and
the terminal's state stays what the target meant. A placeholder may be
longer or shorter than the value it replaces, so a full-screen program's
later cursor positions on that line can be off by the difference: the
picture, not the terminal, is what changes.

What is not masked, and why: channels without a PTY (exec, `scp -O`, tar or
rsync streams are bytes, and a changed byte would corrupt them silently), SFTP
and forwarded connections (files and other protocols), a value split by an
escape sequence (a colour change inside a number) or across two SSH packets
(each packet is masked as it comes, since holding output back to join them
would stall an interactive terminal).
"""

from __future__ import annotations

import re

from proxy.policy.detectors import Scanner

# One escape sequence: CSI (parameters, intermediates, final), OSC or DCS/SOS/PM/APC (to BEL or ST), or ESC and
# one byte (charset designations take two). An unfinished one at the end of a packet stays text: no detector
# matches ESC or its parameters.
ESCAPE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)|[()*+].|[ -~])", re.S)


def mask_terminal(scanner: Scanner, data: bytes) -> tuple[bytes, tuple[str, ...]] | None:
    """`data` with detected values in its text masked; None: nothing found (the bytes go as they are)."""
    pieces: list[bytes] = []
    kinds: list[str] = []
    cursor = 0
    for match in ESCAPE.finditer(data):
        if match.start() > cursor:
            _text(scanner, data[cursor:match.start()], pieces, kinds)
        sequence = match.group()
        if sequence.startswith(b"\x1b]"):  # OSC: its text (a window title, a link) is shown too; its frame is kept
            end = len(sequence) - (1 if sequence.endswith(b"\x07") else 2)
            pieces.append(sequence[:2])
            _text(scanner, sequence[2:end], pieces, kinds)
            pieces.append(sequence[end:])
        else:
            pieces.append(sequence)
        cursor = match.end()
    if cursor < len(data):
        _text(scanner, data[cursor:], pieces, kinds)
    if not kinds:
        return None
    return b"".join(pieces), tuple(dict.fromkeys(kinds))


def _text(scanner: Scanner, text: bytes, pieces: list[bytes], kinds: list[str]) -> None:
    masked, found = scanner.mask_bytes(text)
    pieces.append(masked)
    kinds.extend(found)
