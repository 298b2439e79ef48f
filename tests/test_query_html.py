"""The HTML replay in a real browser: headless Chromium renders it offline, we read its DOM and its pixels."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from ingest.keys import Keyring
from query.views import open_ledger
from query.html import render_html
from query.replay import replay_session
from query.sample import build_demo_ledger

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(*args: str) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).exists(), "chromium is not installed; `./dev test` installs it"
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    demo = build_demo_ledger(tmp_path_factory.mktemp("demo"), sessions=40, statements=8)
    con = open_ledger(demo.ledger_dir)
    session = con.execute("SELECT session_id FROM statements WHERE policy_action = 'approve' "
                          "ORDER BY ts LIMIT 1").fetchall()[0][0]
    path = tmp_path_factory.mktemp("html") / "replay.html"
    path.write_text(render_html(replay_session(con, session, Keyring.load(demo.keyring))), encoding="utf-8")
    return path


def test_page_is_self_contained(page):
    html = page.read_text(encoding="utf-8")
    assert "<script" not in html and "http://" not in html.replace("http-equiv", "")
    assert "https://" not in html.replace("https://idp.example.com/", "")
    assert "default-src 'none'" in html


def test_chromium_renders_the_timeline(page):
    dom = chromium("--dump-dom", page.as_uri()).stdout
    assert "VERIFIED session" in dom
    for text in ("HOLD by rule approve-bulk-delete", "APPROVE by rule approve-bulk-delete",
                 "approver: carol@example.com (security)", "client_terminate", 'class="tick"'):
        assert text in dom, text
    assert dom.count('class="step"') > 5


def test_screenshot_is_a_real_picture(page, tmp_path):
    shot = tmp_path / "replay.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    image = Image.open(shot)
    assert image.format == "PNG" and image.size == (1280, 2000)
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, cards, the verdict bar and ticks, not a blank page
    header = image.convert("RGB").getpixel((5, 5))
    assert header == (0x1d, 0x23, 0x30)  # the dark header rendered, so the inline CSS applied
