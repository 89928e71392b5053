"""The web console driven in a real headless Chromium (Debian's chromium and
chromedriver, through selenium) against real NATS, PostgreSQL and a running
dlqproc service: sign in, filter, open a row, replay it and watch it land in
its tenant's table, resolve it with a note, bulk-replay a filter and watch
the job's progress reach its end; hostile payloads render as text. Every page
is saved as a screenshot under test-artifacts/console/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import CHAT, table

from dlqproc.embedded import free_port
from support.exhausted import exhausted_row, migrate, query, store_rows
from support.service import TESTS_DIR, Service, wait_until

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = TESTS_DIR.parent / "test-artifacts" / "console"
TOKEN = "browser-token-" + "Zk3m" * 6
XSS = {
    "chat_id": "<script>window.pwned=1</script>",
    "push_name": '"><img src=x onerror="window.pwned=2">',
    "url": "javascript:window.pwned=3",
}
BULK = 100


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are not installed (.ci/run installs them)")
        pytest.skip("chromium and chromium-driver are not installed")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--disable-gpu"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=ChromeService(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class Console:
    """`dlqproc console` as a child process."""

    def __init__(self, svc: Service, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "console.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(TESTS_DIR),
            "POSTGRES_DSN": svc.dsn,
            "NATS_URL": svc.nats_url,
            "NATS_DLQSUBJECT": "v1.dlq",
            "CONSOLE_PORT": str(self.port),
            "CONSOLE_TOKEN": TOKEN,
            "LOG_LEVEL": "INFO",
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dlqproc", "console"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_until(lambda: "listening on" in self.log_text() or self.proc.poll() is not None, 60)
        assert self.proc.poll() is None, self.log_text()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


class Page:
    def __init__(self, driver: WebDriver, base: str) -> None:
        self.d, self.base = driver, base
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.sources: list[str] = []

    def go(self, path: str) -> None:
        self.d.get(self.base + path)
        self.sources.append(self.d.page_source)

    def el(self, css: str) -> Any:
        return self.d.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[Any]:
        return list(self.d.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str) -> str:
        return str(self.el(css).text)

    def wait(self, pred: Callable[[], Any], timeout: float = 60) -> Any:
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.1).until(lambda _: pred())
        except Exception:
            self.d.save_screenshot(str(ARTIFACTS / "failed.png"))
            raise AssertionError(f"at {self.d.current_url}:\n{self.d.page_source[:3000]}") from None

    def shot(self, name: str) -> None:
        self.sources.append(self.d.page_source)
        self.d.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def _bulk_chats(dsn: str, tenant: str, n: int) -> None:
    """`n` exhausted rows of valid chats (their upserts land when replayed)."""
    query(
        dsn,
        "INSERT INTO exhausted_events (company_id, source_subject, last_error, retry_count,"
        " dlq_payload, original_payload, reason, dlq_stream, dlq_sequence, payload_digest)"
        " SELECT %(t)s, 'v1.chats.upsert.' || %(t)s, 'timeout ' || g, 5, '{}'::jsonb,"
        "  jsonb_build_object('chat_id', 'bulk-' || g, 'jid', g || '@s.whatsapp.net',"
        "   'agent_id', 'ag1', 'phone_number', g::text, 'unread_count', 0),"
        "  'retries_exhausted', 'bulk', g, md5('bulk' || g) FROM generate_series(1, %(n)s) g"
        " RETURNING id",
        {"t": tenant, "n": n},
    )


def test_console_in_a_browser(
    pipeline: Callable[..., Service], browser: WebDriver, tmp_path: Path
) -> None:
    svc = pipeline()
    migrate(svc.dsn)
    good, hostile = store_rows(
        svc.dsn,
        [
            exhausted_row(1, "acme", "v1.chats.upsert", CHAT, error="upsert timed out"),
            exhausted_row(
                2, "acme", "v1.chats.upsert", XSS,
                reason="validation", error='<img src=x onerror="window.pwned=4"> bad',
            ),
        ],
    )  # fmt: skip
    _bulk_chats(svc.dsn, "globex", BULK)
    console = Console(svc, tmp_path)
    page = Page(browser, console.url)
    try:
        # Signing in: the operator's name becomes the audit trail's actor.
        page.go("/")
        assert "/login" in browser.current_url
        page.el("#login-operator").send_keys("ann")
        page.el("#login-token").send_keys(TOKEN)
        page.shot("login")
        page.el("#login button[type=submit]").click()
        page.wait(lambda: page.all("#pivot"))
        assert page.text("#operator") == "ann"
        assert "globex" in page.text("#pivot") and "acme" in page.text("#pivot")
        assert len(page.all("#chart rect")) == 24
        page.shot("overview")

        # Filtering: the query lands in the URL; the same URL opens the same view.
        page.go("/list")
        page.el("input[name=tenant]").send_keys("acme")
        page.el("#apply").click()
        page.wait(lambda: "tenant=acme" in browser.current_url)
        ids = [int(tr.get_attribute("data-id")) for tr in page.all("#rows tbody tr")]
        assert sorted(ids) == sorted([good, hostile])
        assert page.text("#total") == "2"
        page.shot("list")

        # Hostile values are text: no element was injected, no script ran.
        page.el(f'#rows tr[data-id="{hostile}"] a.row-link').click()
        page.wait(lambda: page.all("#payload"))
        assert browser.execute_script("return window.pwned === undefined") is True
        assert not page.all("img"), "an <img> from a payload was rendered"
        assert len(page.all("script")) == 1
        payload = page.text("#payload")
        assert "<script>window.pwned=1</script>" in payload
        assert r"\"><img src=x onerror=\"window.pwned=2\">" in payload  # JSON's quoting
        assert "javascript:window.pwned=3" in payload
        assert '<img src=x onerror="window.pwned=4"> bad' in page.text("#last-error")
        hrefs = [a.get_attribute("href") or "" for a in page.all("a")]
        assert not [h for h in hrefs if "javascript" in h or "pwned" in h]
        page.shot("detail-hostile")

        # Replay one row to its source subject; it lands in the tenant's table.
        page.go(f"/events/{good}")
        page.el("#replay-form input[name=note]").send_keys("upstream is back")
        page.el("#replay-source").click()
        page.wait(lambda: page.all("#flash"))
        assert page.text("#flash") == "Replayed."
        assert page.text("#replay-count") == "1"
        replay = page.el("#history tr.action-replay")
        assert replay.find_element(By.CSS_SELECTOR, ".actor").text == "ann"
        wait_until(lambda: table(svc, "acme", "chats"), timeout=60)
        assert table(svc, "acme", "chats")[0]["chat_id"] == CHAT["chat_id"]

        # Resolve it with a note.
        page.el("#resolve-note").send_keys("chat arrived after replay")
        page.el("#resolve").click()
        page.wait(lambda: page.all("#flash") and page.text("#flash") == "Resolved.")
        assert page.text("#state") == "resolved"
        resolve = page.el("#history tr.action-resolve")
        assert resolve.find_element(By.CSS_SELECTOR, ".actor").text == "ann"
        assert resolve.find_element(By.CSS_SELECTOR, ".note").text == "chat arrived after replay"
        page.shot("detail")

        # Bulk replay of a filter: the count first, then a job whose progress
        # the page follows without reloading.
        page.go("/list?tenant=globex")
        page.el("#bulk-replay").click()
        page.wait(lambda: page.all("#bulk-count"))
        assert page.text("#bulk-count") == str(BULK)
        rate = page.el("#bulk-form input[name=rate]")
        rate.clear()
        rate.send_keys("50")  # two seconds of progress to watch
        page.shot("bulk")
        page.el("#bulk-start").click()
        page.wait(lambda: page.all("#job-state"))
        browser.execute_script("window.stillHere = true")
        seen = set()

        def finished() -> bool:
            seen.add(page.text("#job-done"))
            return page.text("#job-state") == "done"

        page.wait(finished, timeout=120)
        assert browser.execute_script("return window.stillHere === true") is True
        assert page.text("#job-done") == str(BULK) and page.text("#job-total") == str(BULK)
        assert page.text("#job-published") == str(BULK)
        assert int(page.el("#job-bar").get_attribute("value")) == BULK
        assert len(seen) > 2, seen  # it moved while we watched
        page.shot("job")
        wait_until(lambda: len(table(svc, "globex", "chats")) == BULK, timeout=120)
        actors = query(svc.dsn, "SELECT DISTINCT actor FROM exhausted_audit")
        assert actors == [("ann",)]
    finally:
        console.stop()
    for source in page.sources:
        assert TOKEN not in source
    assert TOKEN not in console.log_text()
    assert svc.dsn not in console.log_text()
    shutil.copy(ARTIFACTS / "overview.png", tmp_path / "overview.png")
