"""A replay as one self-contained HTML page: a timeline an investigator can scan.

No network, no scripts: inline CSS only, so the file can be attached to a case
and opened anywhere, years later. A bar across the top places every step on
the session's time axis (statements, errors, policy decisions in their own
colours); below it, one card per step with its offset, who decided what, and
result rows as the client saw them (masked rows marked). Everything from the
evidence is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

from ingest.protocols.render import Renderer
from query.render import describe, offset, who
from query.replay import Replay

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{padding:20px 32px;background:#1d2330;color:#fff}
header h1{margin:0 0 6px;font-size:20px}
header .meta{color:#c3c9d5}
.verdict{margin:0 32px;padding:12px 16px;font-weight:600;border-radius:0 0 8px 8px}
.verdict.ok{background:#dff5e3;color:#135c24}.verdict.bad{background:#fde2e1;color:#8a1c17}
.axis{position:relative;height:34px;margin:18px 32px 4px;background:#fff;border:1px solid #d8dce3;border-radius:6px}
.tick{position:absolute;top:4px;width:4px;height:24px;border-radius:2px;margin-left:-2px}
.legend{margin:0 32px 12px;color:#5b6475;font-size:12px}
.legend span{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 12px;vertical-align:-1px}
ol.timeline{list-style:none;margin:0 32px 32px;padding:0 0 0 18px;border-left:3px solid #d8dce3}
.step{position:relative;margin:10px 0;padding:10px 14px;background:#fff;border:1px solid #d8dce3;border-radius:8px}
.step::before{content:"";position:absolute;left:-27px;top:14px;width:13px;height:13px;border-radius:50%;background:var(--c);border:2px solid #fff}
.step .when{float:right;color:#5b6475;font-variant-numeric:tabular-nums}
.step .kind{display:inline-block;min-width:64px;font-size:11px;font-weight:700;letter-spacing:.04em;color:var(--c)}
.step .head{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;word-break:break-word}
.step .detail{margin-top:6px;color:#3b4354}
table{border-collapse:collapse;margin-top:8px;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
th,td{border:1px solid #d8dce3;padding:3px 8px;text-align:left}th{background:#eef0f4}
tr.masked td{background:#fff6d6}.null{color:#8a93a5;font-style:italic}
.where{display:inline-block;padding:0 6px;border-radius:4px;background:#eef0f4;color:#3b4354;font-size:11px;margin-left:6px}
.badge{display:inline-block;padding:0 6px;border-radius:4px;background:#fff6d6;color:#7a5a00;font-size:11px;margin-left:6px}
"""

COLOURS = {"START": "#2f6fde", "SQL": "#1d2330", "CLIENT": "#8a93a5", "SERVER": "#5b6475", "RESULT": "#1f9d55",
           "ERROR": "#d64545", "POLICY": "#e08a00", "PROTOCOL": "#b4236b", "END": "#2f6fde"}
OTHER = "#8a93a5"  # a marker of some protocol's renderer that has no colour of its own
LEGEND = ("SQL", "RESULT", "ERROR", "POLICY", "PROTOCOL")


def _rows_table(step: dict[str, Any]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in step["columns"])
    masked = set(step["masked_rows"])
    body = []
    for i, row in enumerate(step["rows"]):
        cells = "".join('<td class="null">NULL</td>' if v is None else f"<td>{escape(v)}</td>" for v in row)
        body.append(f'<tr class="masked">{cells}</tr>' if i in masked else f"<tr>{cells}</tr>")
    more = step["row_count"] - len(step["rows"])
    tail = f'<div class="detail">… {more} more rows</div>' if more > 0 else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{tail}"


def _card(step: dict[str, Any], renderer: Renderer) -> str:
    marker, head, detail = describe(step, renderer)
    rows = _rows_table(step) if step.get("columns") is not None else ""
    badge = '<span class="badge">masked values</span>' if step.get("masked_rows") else ""
    lines = "".join(f'<div class="detail">{escape(line)}</div>' for line in detail)
    return (f'<li class="step" style="--c:{COLOURS.get(marker, OTHER)}"><span class="when">'
            f'{escape(offset(step["offset_s"]))} · #{step["seq"]}</span><span class="kind">{escape(marker)}</span>'
            f'{_where(step)}{badge}'
            f'<div class="head">{escape(head)}</div>{lines}{rows}</li>')


def _where(step: dict[str, Any]) -> str:
    """A Frames step's direction, as a badge (its channel is a detail line, from `describe`)."""
    if "direction" not in step:
        return ""
    return f'<span class="where" data-direction="{escape(step["direction"])}">{escape(step["direction"])}</span>'


def _axis(replay: Replay, renderer: Renderer) -> str:
    total = max((s["offset_s"] for s in replay.steps), default=0) or 1
    ticks = []
    for step in replay.steps:
        marker = describe(step, renderer)[0]
        if marker in LEGEND:
            left = 1 + 98 * step["offset_s"] / total
            ticks.append(f'<div class="tick" title="{escape(marker)} {escape(offset(step["offset_s"]))}" '
                         f'style="left:{left:.2f}%;background:{COLOURS[marker]}"></div>')
    legend = "".join(f'<span style="background:{COLOURS[m]}"></span>{m.lower()}' for m in LEGEND)
    return f'<div class="axis">{"".join(ticks)}</div><div class="legend">timeline of {offset(total)[1:]}{legend}</div>'


def render_html(replay: Replay) -> str:
    start = next((s for s in replay.steps if s["step"] == "start"), None)
    title = f"Session {replay.verification.session_id}"
    meta = (f"{who(start['identity'])} · {start['source_address']} → {start['target']} ({start['protocol']}, "
            f"{start['client_application'] or 'unknown client'}) · " if start else "")
    meta += replay.started.strftime("%Y-%m-%d %H:%M:%S UTC")
    verdict = "ok" if replay.verification.ok else "bad"
    renderer = replay.renderer
    cards = "".join(_card(s, renderer) for s in replay.steps)
    player = getattr(renderer, "html_player", None)  # a terminal protocol's screen, played (SSH): no script
    terminal = player(replay.steps) if player is not None else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">'
            f"<style>{CSS}</style></head><body><header><h1>{escape(title)}</h1>"
            f'<div class="meta">{escape(meta)}</div></header>'
            f'<div class="verdict {verdict}">{escape(replay.verification.line)}</div>'
            f'{_axis(replay, renderer)}{terminal}<ol class="timeline">{cards}</ol></body></html>\n')
