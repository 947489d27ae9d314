"""The status page in a real browser: Debian's headless chromium, driven by Playwright.

Playwright's own browser download is not used (`executable_path`); `make test` installs
chromium when it is missing, and this test is skipped, saying so, only when it could not.
Every wait is Playwright's waiting on the DOM, with a deadline; nothing sleeps.

`QOPER8_SCREENSHOT=docs/status-page.png` also writes the screenshot there (the README's).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.harness import Connection, running_daemon

pytestmark = pytest.mark.timeout(90)

CHROMIUM = shutil.which("chromium")
#: Milliseconds any one wait on the page may take (a loaded two-core machine included).
WAIT_MS = 30_000


def status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/status", timeout=20) as response:  # noqa: S310
        snapshot: dict[str, Any] = json.load(response)
        return snapshot


def exits(url: str) -> list[dict[str, Any]]:
    """The pool's recent worker exits once the restart has been counted."""
    snapshot = status(url)
    assert snapshot["restarts"] == 1
    found: list[dict[str, Any]] = snapshot["recent_exits"]
    return found


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `make test` installs it (apt-get)")
def test_the_status_page_shows_live_workers_and_counts(short_tmp: Path, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    with (
        running_daemon(short_tmp, http={"listen": "127.0.0.1:0", "push_interval": 0.2}) as d,
        Connection(d.socket) as c,
        sync_playwright() as playwright,
    ):
        url = d.wait_event("http.listening")["url"]
        pids = [w["pid"] for w in status(url)["workers"]]
        # As root, chromium's sandbox cannot start; the page is our own.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"{url}/", timeout=WAIT_MS)
            expect(page.locator("#link")).to_have_text("live", timeout=WAIT_MS)
            for slot, pid in enumerate(pids):
                cell = page.locator(f'#workers tr[data-slot="{slot}"] td.pid')
                expect(cell).to_have_text(str(pid), timeout=WAIT_MS)
            expect(page.locator("#done")).to_have_text("0", timeout=WAIT_MS)

            c.send(*[{"id": i, "op": "submit", "action": {"mode": "ok"}} for i in range(12)])
            c.send({"id": "bad", "op": "submit", "action": {"mode": "raise"}})
            c.send({"id": "lost", "op": "submit", "action": {"mode": "exit", "code": 3}})
            answers = c.receive_all(14)
            assert sum("result" in a for a in answers) == 12
            expect(page.locator("#submitted")).to_have_text("14", timeout=WAIT_MS)
            expect(page.locator("#done")).to_have_text("12", timeout=WAIT_MS)
            expect(page.locator("#failed")).to_have_text("2", timeout=WAIT_MS)
            expect(page.locator("#restarts")).to_have_text("1", timeout=WAIT_MS)
            # Newest first, once the pool reports exits (`recent_exits`, maybe none yet).
            for row, gone in enumerate(reversed(exits(url))):
                cell = page.locator("#exits tr").nth(row)
                expect(cell).to_contain_text(str(gone["pid"]), timeout=WAIT_MS)
            expect(page.locator("#pool-state")).to_have_text("running", timeout=WAIT_MS)

            shot = tmp_path / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if target := os.environ.get("QOPER8_SCREENSHOT"):
                shutil.copyfile(shot, target)
        finally:
            browser.close()
