"""The typed-line rebuilder of interactive SSH shells (sans-I/O): what it follows exactly, what it marks uncertain,
and the two heuristics (full-screen programs, password prompts)."""

from __future__ import annotations

from ingest.protocols.ssh.terminal import LineEditor, Line, Piece


def lines(editor: LineEditor, *chunks: bytes) -> list[Line]:
    return [p.line for chunk in chunks for p in editor.feed(chunk) if p.line is not None]


def test_enter_splits_the_keys_and_ends_the_line_with_what_was_typed():
    editor = LineEditor()
    assert editor.feed(b"ls -l\rpwd\n") == [Piece(b"ls -l"), Piece(b"\r", Line("ls -l")), Piece(b"pwd"),
                                           Piece(b"\n", Line("pwd"))]
    assert editor.feed(b"ec") == [Piece(b"ec")] and editor.feed(b"ho hi") == [Piece(b"ho hi")]
    assert lines(editor, b"\r") == [Line("echo hi")]


def test_erasing_keys_are_followed():
    editor = LineEditor()
    assert lines(editor, "caf\u00e9\x7f\x7fat\r".encode()) == [Line("caat")]  # DEL takes a whole UTF-8 character
    assert lines(editor, b"rm -rf /tmp/x\x15ls\r") == [Line("ls")]  # ^U
    assert lines(editor, b"rm -rf /  \x17echo\r") == [Line("rm -rf echo")]  # ^W: the last word and its blanks
    assert lines(editor, b"rm -rf /\x03\rdate\x08\x08te\r") == [Line(""), Line("date")]  # ^C abandons the line


def test_editing_the_proxy_cannot_follow_makes_the_line_uncertain():
    editor = LineEditor()
    assert lines(editor, b"\x1b", b"[A\r") == [Line("", uncertain=True)]  # history, the key split across packets
    assert lines(editor, b"ls /et\t\r") == [Line("ls /et", uncertain=True)]  # completion
    assert lines(editor, b"cat x\x1bOD\x1bby\r") == [Line("cat xy", uncertain=True)]
    assert lines(editor, b"id\r") == [Line("id")]  # the next line starts certain again


def test_bracketed_paste_is_text_even_with_newlines():
    editor = LineEditor()
    pieces = editor.feed(b"\x1b[200~echo a\rrm -rf /\x1b[201~\r")
    assert pieces[-1].line == Line("echo a\nrm -rf /") and len(pieces) == 2


def test_full_screen_programs_and_password_prompts():
    editor = LineEditor()
    editor.output(b"\x1b[?1049h\x1b[H~\r\n~")
    assert lines(editor, b":wq\r") == [Line(":wq", full_screen=True)]
    editor.output(b"\x1b[?1049l$ ")
    assert lines(editor, b"ls\r") == [Line("ls")]
    editor.output(b"\r\n[sudo] password for root: ")
    assert lines(editor, b"hunter2\r") == [Line("", secret=True)]
    editor.output(b"\r\n\x1b[1;32mroot@host\x1b[0m:~# ")
    assert lines(editor, b"ls\r") == [Line("ls")]


def test_terminal_masking_keeps_every_escape_sequence_byte_for_byte():
    from proxy.policy.detectors import scanner_for
    from proxy.ssh.masking import ESCAPE, mask_terminal

    scanner = scanner_for(frozenset({"email", "credit_card"}))
    data = (b"\x1b[1;32mroot@h\x1b[0m:~# \x1b[?2004h\x1b(B\x1b]0;bob@example.com\x1b\\\x1b]8;;mailto:eve@example.com"
            b"\x07link\x1b]8;;\x07 4111 1111 1111 1111\r\n\x1b[38;5;4111m")
    masked, kinds = mask_terminal(scanner, data)
    assert kinds == ("email", "credit_card")
    assert b"bob@example.com" not in masked and b"eve@example.com" not in masked and b"**** 1111" in masked
    assert [m.group() for m in ESCAPE.finditer(masked) if not m.group().startswith(b"\x1b]")] == [
        m.group() for m in ESCAPE.finditer(data) if not m.group().startswith(b"\x1b]")]
    assert masked.count(b"\x1b]") == 3 and masked.endswith(b"\x1b[38;5;4111m")
    assert mask_terminal(scanner, b"\x1b[31mnothing to hide\x1b[0m") is None
