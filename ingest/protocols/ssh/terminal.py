"""The command lines a person or an agent types into an interactive shell, rebuilt from the keystrokes.

A shell channel with a PTY carries keystrokes, not commands: the target's
line editor (readline, zle, the tty's own canonical mode) turns them into a
line only when Enter arrives. To decide on a typed command the proxy keeps
its own copy of the line being typed (`LineEditor.feed`) and stops at each
Enter, so that the Enter can be withheld until policy has decided.

Best effort, and said so: what the proxy rebuilds is what a line editor
would hold if the keys only inserted and erased at the end of the line.
Printable text (UTF-8), Backspace/DEL, ^U, ^W, ^C (the line is abandoned) and
bracketed paste are followed exactly; cursor movement, history, completion
(Tab) and other editing keys are not (the target may hold another line than
the one rebuilt), so such a line is marked `uncertain`; and a shell can
always build a command the line does not show (variables, `eval`, scripts).
Two heuristics keep lines that are no commands out of policy: while the
target shows the alternate screen (a full-screen program such as vim or
less) no line is a command, and a line typed after a password-like prompt
(`Password:`, `passphrase`) is `secret`: its text is not kept.

Sans-I/O: bytes in, `Piece`s out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ENTER = (0x0D, 0x0A)
ERASE = (0x7F, 0x08)
KILL_LINE, KILL_WORD, INTERRUPT, CLEAR_SCREEN, TAB, ESC = 0x15, 0x17, 0x03, 0x0C, 0x09, 0x1B
PASTE_START, PASTE_END = b"\x1b[200~", b"\x1b[201~"
MAX_LINE = 64 * 1024  # a longer "line" is not typed: it is kept whole no further, and uncertain
OUTPUT_TAIL = 512  # what the target last showed, for the prompt heuristic
# Lines after a prompt like these are secrets (sudo, ssh-keygen, su, passwd, mysql -p…).
SECRET_PROMPT = re.compile(rb"(?i)(password|passphrase|passcode|\bpin\b|secret)[^\n]{0,80}[:?]\s*$")
ALTERNATE_ON = re.compile(rb"\x1b\[\?(1049|1047|47)h")
ALTERNATE_OFF = re.compile(rb"\x1b\[\?(1049|1047|47)l")
ANSI = re.compile(rb"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


@dataclass(frozen=True, slots=True)
class Line:
    """One line ended by Enter: its text as rebuilt, and how far to trust it."""

    text: str
    uncertain: bool = False  # cursor movement, history or completion was used: the target may hold another line
    secret: bool = False  # typed at a password-like prompt: the text is not kept (empty)
    full_screen: bool = False  # typed while a full-screen program had the terminal: not a command


@dataclass(frozen=True, slots=True)
class Piece:
    """Keystroke bytes to relay as they are (`line` None), or one Enter's bytes and the line it ends."""

    data: bytes
    line: Line | None = None


class LineEditor:
    """The line being typed on one shell channel; the target's output feeds the two heuristics."""

    def __init__(self) -> None:
        self._line = bytearray()
        self._uncertain = False
        self._escape = bytearray()  # an escape sequence being read (keys arrive split across packets)
        self._paste = False
        self._tail = b""
        self._full_screen = False

    def output(self, data: bytes) -> None:
        """What the target showed: the alternate screen on or off, and the last line (a password prompt?)."""
        on = [m.end() for m in ALTERNATE_ON.finditer(data)]
        off = [m.end() for m in ALTERNATE_OFF.finditer(data)]
        if on or off:
            self._full_screen = max(on, default=-1) > max(off, default=-1)
        self._tail = (self._tail + data)[-OUTPUT_TAIL:]

    def feed(self, data: bytes) -> list[Piece]:
        """Split the keystrokes at each Enter: the bytes before it to relay, then the Enter with its line."""
        pieces: list[Piece] = []
        start = 0
        for i, byte in enumerate(data):
            if self._escape or byte == ESC:
                self._escape_byte(byte)
            elif byte in ENTER:
                if self._paste:
                    self._append(b"\n")
                    continue
                if i > start:
                    pieces.append(Piece(data[start:i]))
                pieces.append(Piece(data[i:i + 1], self._end_line()))
                start = i + 1
            elif byte in ERASE:
                self._erase_char()
            elif byte == KILL_LINE:
                self._line.clear()
            elif byte == KILL_WORD:
                self._erase_word()
            elif byte == INTERRUPT:
                self._line.clear()
                self._uncertain = False
            elif byte == CLEAR_SCREEN:
                pass
            elif byte < 0x20:
                self._uncertain = True  # ^A ^E ^K ^R ^P ^N Tab…: the target's editor did something we do not follow
            else:
                self._append(bytes((byte,)))
        if start < len(data):
            pieces.append(Piece(data[start:]))
        return pieces

    def _append(self, data: bytes) -> None:
        if len(self._line) + len(data) > MAX_LINE:
            self._uncertain = True
            return
        self._line += data

    def _erase_char(self) -> None:
        while self._line:
            last = self._line.pop()
            if last & 0xC0 != 0x80:  # not a UTF-8 continuation byte: one character gone
                break

    def _erase_word(self) -> None:
        while self._line and self._line[-1:] in (b" ", b"\t"):
            self._line.pop()
        while self._line and self._line[-1:] not in (b" ", b"\t"):
            self._line.pop()

    def _escape_byte(self, byte: int) -> None:
        self._escape.append(byte)
        seq = bytes(self._escape)
        if len(seq) == 1:
            return
        if seq[1:2] == b"[":  # CSI: parameters, then a final byte in @..~
            if len(seq) > 2 and 0x40 <= byte <= 0x7E:
                self._escape.clear()
                if seq == PASTE_START:
                    self._paste = True
                elif seq == PASTE_END:
                    self._paste = False
                else:
                    self._uncertain = True  # arrows, Home/End, Delete…
            elif len(seq) > 32:
                self._escape.clear()
                self._uncertain = True
            return
        if seq[1:2] == b"O" and len(seq) < 3:  # SS3: one more byte (application cursor keys)
            return
        self._escape.clear()
        self._uncertain = True  # Meta-x, SS3 keys: word moves, history…

    def _end_line(self) -> Line:
        text = bytes(self._line).decode("utf-8", "replace")
        secret = SECRET_PROMPT.search(ANSI.sub(b"", self._tail)) is not None
        line = Line("" if secret else text, self._uncertain, secret, self._full_screen)
        self._line.clear()
        self._uncertain = False
        self._tail = b""  # the next line's prompt is what comes after this Enter
        return line
