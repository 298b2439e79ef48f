"""The terminal emulator behind the HTML replay (sans-I/O) and the frames the player takes from it."""

from __future__ import annotations

from ingest.protocols.ssh.player import frames, html
from ingest.protocols.ssh.screen import Screen


def shown(columns: int, rows: int, *chunks: bytes) -> list[str]:
    screen = Screen(columns, rows)
    for chunk in chunks:
        screen.feed(chunk)
    return screen.text().split("\n")


def test_text_wraps_scrolls_and_returns():
    assert shown(5, 3, b"abcdefg\r\nxy\rZ") == ["abcde", "fg", "Zy"]
    assert shown(4, 2, b"1\r\n2\r\n3\r\n") == ["3", ""]
    assert shown(10, 1, b"ab\bc\tz") == ["ac      z"]
    assert shown(10, 1, "caf\u00e9".encode()[:4], "caf\u00e9".encode()[4:]) == ["caf\u00e9"]  # UTF-8 split anywhere


def test_cursor_moves_and_erases_as_a_line_editor_uses_them():
    # bash redrawing after a history recall: CR, the prompt, erase to the end of the line
    assert shown(20, 2, b"$ rm -rf /tmp/x", b"\r$ ls\x1b[K") == ["$ ls", ""]
    assert shown(10, 3, b"aaaa\r\nbbbb\r\ncccc\x1b[2;3H\x1b[1KX\x1b[3;1H\x1b[2K") == ["aaaa", "  Xb", ""]
    assert shown(10, 2, b"abcdef\x1b[1;2H\x1b[2P\x1b[1@") == ["a def", ""]
    assert shown(10, 3, b"1\r\n2\r\n3\x1b[2;1H\x1b[L") == ["1", "", "2"]
    assert shown(10, 2, b"xx\x1b[2J\x1b[Hok") == ["ok", ""]


def test_attributes_titles_and_unknown_sequences_never_show():
    assert shown(20, 1, b"\x1b[1;31mred\x1b[0m \x1b]0;title\x07\x1b(B\x1b[?2004hok\x1b[>4;1m") == ["red ok"]
    assert shown(20, 1, b"\x1b]2;t\x1b\\x\x1b[12;34;56;78;90;1;2;3;4;5;6;7;8;9;0;1;2;3;4;5;6;7;8;9;0;1;2;3;4;5;6;7;8;9m") == ["x"]


def test_the_alternate_screen_is_left_as_it_was():
    assert shown(10, 2, b"$ vi\x1b[?1049h\x1b[H~ file", b"\x1b[?1049l\r\n$ ") == ["$ vi", "$"]
    screen = Screen(10, 2)
    screen.feed(b"$ top\x1b[?1049h")
    screen.resize(6, 3)
    screen.feed(b"\x1b[?1049l")
    assert screen.text().split("\n") == ["$ top", "", ""]


def test_frames_follow_bursts_and_resizes():
    taken = frames(20, 2, [(0.1, "o", "a"), (0.11, "o", "b"), (1.0, "o", "\r\nc"), (1.2, "r", "10x2"),
                           (1.3, "i", "ignored"), (1.3, "m", "a marker")])
    assert [(at, columns, text) for at, columns, _, text in taken] == [
        (0.0, 20, "\n"), (0.11, 20, "ab\n"), (1.0, 20, "ab\nc"), (1.2, 10, "ab\nc")]
    page = html(20, 2, [(0.5, "o", "<b>&</b>")], "Terminal")
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in page and "<b>" not in page and "<script" not in page
