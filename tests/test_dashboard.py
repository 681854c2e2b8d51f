"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright), against
a real deployment with API keys: the page loads with no console error, its numbers agree with
/health and /metrics, jobs appear and end without a reload, and the admin actions work with
an admin key and are absent with a predict key. It saves the README's screenshot.

`make test` installs Chromium when it runs as root; elsewhere these tests skip, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.helpers import ROOT, wait_for
from tests.stacks import FaultStack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium here: `make test` installs it when run as root (apt-get install chromium)",
)
ADMIN, READER = "a-key", "p-key"
SCREENSHOT = ROOT / "docs" / "dashboard.png"


@pytest.fixture
def keyed_stack(tmp_path: Path, demo_models: Path) -> Iterator[FaultStack]:
    stack = FaultStack(tmp_path, demo_models, HUEYSERVE_API_KEYS=READER, HUEYSERVE_ADMIN_KEYS=ADMIN)
    try:
        stack.add_consumer()
        wait_for(stack.ready, "the stack to be ready", timeout_s=60)
        yield stack
    finally:
        stack.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            launched.close()


class Page:
    """A dashboard tab that records every console error and uncaught exception."""

    def __init__(self, browser: Any, base: str) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(base + "/")

    def sign_in(self, key: str) -> None:
        self.page.fill("#key", key)
        self.page.click("#login button")
        self.page.wait_for_selector("#live.ok", timeout=15_000)

    def text(self, selector: str) -> str:
        return str(self.page.inner_text(selector)).strip()


def api(stack: FaultStack, key: str = ADMIN) -> httpx.Client:
    return httpx.Client(base_url=stack.base, headers={"X-API-Key": key}, timeout=30)


def test_the_dashboard_is_live_agrees_with_health_and_metrics_and_administers(
    keyed_stack: FaultStack, browser: Any, tmp_path: Path
) -> None:
    stack = keyed_stack
    tab = Page(browser, stack.base)
    tab.page.wait_for_selector("#login", state="visible")
    assert "needs an API key" in tab.text("#message")  # nothing shown without a key
    tab.sign_in(ADMIN)
    assert tab.text("#access") == "admin"

    with api(stack) as client:
        # A prediction and a training submitted now appear and reach `done` live.
        job = client.post("/v1/jobs", json={"model": "iris", "instances": [[5.1, 3.5, 1.4, 0.2]]})
        predict_id = job.json()["job_id"]
        body = {"estimator": "RandomForestRegressor", "params": {"n_estimators": 100}}
        train_id = client.post("/v1/models/diabetes/train", json=body).json()["job_id"]
        for job_id in (predict_id, train_id):
            tab.page.wait_for_selector(f"tr[data-job='{job_id}'] .status-done", timeout=60_000)
        assert "published" in tab.text(f"tr[data-job='{train_id}']")

        # Its numbers are those of /health and /metrics (read after the next refresh).
        tab.page.wait_for_timeout(5_500)
        health = client.get("/health").json()
        metrics = client.get("/metrics").text
        assert int(tab.text("#workers-count")) == len(health["redis"]["workers"]) == 1
        depth = sum(float(v) for v in re.findall(r"hueyserve_queue_depth\{[^}]*\} (\S+)", metrics))
        assert int(tab.text("#queue-total")) == health["redis"]["queue_depth"] == int(depth)
        for name, active in health["models"].items():
            assert tab.text(f"tr[data-model='{name}'] .active") == active
        assert health["models"]["diabetes"] == "2"
        # The models it holds, as its next heartbeat tells and the next refresh shows.
        tab.page.wait_for_function(
            "['diabetes:2', 'iris:1'].every((m) => "
            "document.getElementById('workers').textContent.includes(m))",
            timeout=20_000,
        )

        # Admin: pin version 1, and see it active everywhere.
        tab.page.select_option("tr[data-model='diabetes'] select", "1")
        tab.page.click("tr[data-model='diabetes'] button:has-text('pin')")
        wait_for(lambda: client.get("/health").json()["models"]["diabetes"] == "1", "the pin")
        tab.page.wait_for_function(
            "document.querySelector(\"tr[data-model='diabetes'] .active\").textContent === '1'"
        )

        # Admin: cancel a queued job (the only consumer paused, so it stays queued).
        consumer = stack.consumers[0]
        os.kill(consumer.pid, signal.SIGSTOP)
        try:
            queued = client.post("/v1/jobs", json={"model": "iris", "instances": [[1, 2, 3, 4]]})
            queued_id = queued.json()["job_id"]
            row = f"tr[data-job='{queued_id}']"
            tab.page.click(f"{row} button:has-text('cancel')", timeout=15_000)
            tab.page.wait_for_selector(f"{row} .status-cancelled", timeout=15_000)
            # Admin: purge the queue (confirmed in the dialog).
            client.post("/v1/jobs", json={"model": "iris", "instances": [[1, 2, 3, 5]]})
            tab.page.once("dialog", lambda dialog: dialog.accept())
            tab.page.click("#purge")
            wait_for(lambda: client.get("/health").json()["redis"]["queue_depth"] == 0, "purge")
        finally:
            os.kill(consumer.pid, signal.SIGCONT)
        assert client.get(f"/v1/jobs/{queued_id}").json()["status"] == "cancelled"

    tab.page.wait_for_timeout(5_500)  # a refresh with the latest numbers, for the picture
    shot = tmp_path / "dashboard.png"
    tab.page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("UPDATE_SCREENSHOT"):  # `make screenshot`: the README's picture
        shutil.copy(shot, SCREENSHOT)
    assert tab.errors == [], tab.errors


def test_a_predict_key_sees_everything_and_changes_nothing(
    keyed_stack: FaultStack, browser: Any
) -> None:
    tab = Page(browser, keyed_stack.base)
    tab.sign_in(READER)
    assert tab.text("#access") == "read-only"
    with api(keyed_stack, READER) as client:
        job_id = client.post("/v1/jobs", json={"model": "iris", "instances": [[1, 2, 3, 4]]})
        found = job_id.json()["job_id"]
        tab.page.wait_for_selector(f"tr[data-job='{found}'] .status-done", timeout=30_000)
    # A job found by id: the whole record, as GET /v1/jobs/{id} gives it.
    tab.page.fill("#job-id", found)
    tab.page.click("#find button")
    tab.page.wait_for_function("document.getElementById('job').textContent.includes('predictions')")
    assert '"status": "done"' in tab.text("#job")
    for admin_only in ("#purge", "tr[data-model='iris'] select", "tr[data-model='iris'] button"):
        assert not tab.page.is_visible(admin_only), admin_only
    # Workers' hosts are for operators, as on /health.
    workers = tab.text("#workers")
    assert tab.text("#workers-count") == "1" and "hidden" in workers
    assert socket.gethostname() not in workers
    # The session cookie reads; it does not change anything (changes need the key itself).
    cookies = {c["name"]: c["value"] for c in tab.page.context.cookies()}
    assert set(cookies) == {"hueyserve_session"}
    with httpx.Client(base_url=keyed_stack.base, cookies=cookies, timeout=10) as cookie_only:
        assert cookie_only.get("/v1/stats").status_code == 200
        assert cookie_only.post("/v1/queue/purge").status_code == 401
    assert tab.errors == [], tab.errors
