"""The terminal of an SSH replay as it looked, played in the HTML replay page with no script and no network.

The recorded output of the terminal channel goes through the screen emulator
(`screen.Screen`); the screen is taken as a frame whenever it changed and at
least `FRAME_SECONDS` passed (or the session ended), at most `MAX_FRAMES`
frames (the interval grows for long sessions). Each frame is a `<pre>` of the
screen's text, hidden until a CSS animation with the frame's offset as its
delay makes it visible; a later frame lies over an earlier one. So the page
plays the session in real time once it is opened (reload to play again),
its CSP stays `default-src 'none'` with inline styles only, and a page that
does not animate (printing, a reader) still shows the last screen. Keystrokes
are not shown as such (the terminal's echo is output; a secret that was not
echoed stays unseen).
"""

from __future__ import annotations

from html import escape

from ..asciicast import Event
from .screen import Screen

FRAME_SECONDS = 0.05
MAX_FRAMES = 1500

CSS = """
.terminal{margin:18px 32px 4px}
.terminal h2{font-size:14px;margin:0 0 6px;color:#3b4354}
.screen{position:relative;background:#11151c;border-radius:6px;overflow:hidden;
 font:13px/1.25 ui-monospace,SFMono-Regular,Menlo,monospace}
.screen pre{position:absolute;top:0;left:0;right:0;bottom:0;margin:0;padding:6px 8px;background:#11151c;
 color:#d8dee9;white-space:pre;visibility:hidden;animation:custody-frame 1ms linear forwards}
.screen pre.last{position:relative}
@keyframes custody-frame{to{visibility:visible}}
@media print{.screen pre{visibility:hidden;animation:none}.screen pre.last{visibility:visible}}
"""


def frames(width: int, height: int, events: list[Event]) -> list[tuple[float, int, int, str]]:
    """(offset, columns, rows, screen text) each time the screen changed: the screen as a burst of output left
    it (a pause of the frame interval ends a burst), and at least every ten intervals during a steady stream."""
    screen = Screen(width, height)
    shown = [(at, kind, data) for at, kind, data in events if kind in "or"]
    end = shown[-1][0] if shown else 0.0
    interval = max(FRAME_SECONDS, end / MAX_FRAMES)
    taken: list[tuple[float, int, int, str]] = [(0.0, width, height, screen.text())]
    previous = 0.0
    for at, kind, data in shown:
        if at - previous >= interval or at - taken[-1][0] >= 10 * interval:
            _take(taken, previous, screen)
        if kind == "o":
            screen.feed(data.encode("utf-8", "surrogateescape"))
        else:
            columns, _, rows = data.partition("x")
            if columns.isdigit() and rows.isdigit():
                screen.resize(int(columns), int(rows))
        previous = at
    _take(taken, previous, screen)
    return taken


def _take(taken: list[tuple[float, int, int, str]], at: float, screen: Screen) -> None:
    frame = (max(at, taken[-1][0]), screen.columns, screen.rows, screen.text())
    if frame[1:] != taken[-1][1:]:
        taken.append(frame)


def html(width: int, height: int, events: list[Event], caption: str) -> str:
    """The player's section: a heading, its own styles, the frames."""
    shown = frames(width, height, events)
    columns = max(f[1] for f in shown)
    rows = max(f[2] for f in shown)
    pres = []
    for i, (at, _, _, text) in enumerate(shown):
        last = ' class="last"' if i == len(shown) - 1 else ""
        pres.append(f'<pre{last} style="animation-delay:{at:.3f}s" data-offset="{at:.3f}">{escape(text)}</pre>')
    return (f'<section class="terminal"><style>{CSS}</style><h2>{escape(caption)} · {len(shown)} frames, '
            f'plays once when opened (reload to replay)</h2>'
            f'<div class="screen" style="width:{columns + 2}ch;min-height:{rows * 1.25:.2f}em">{"".join(pres)}'
            f"</div></section>")
