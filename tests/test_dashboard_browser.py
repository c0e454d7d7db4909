"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright without any browser download) against ``cancel-broker run`` and a worker, each
its own process. Open the page, see a run appear, press Cancel, see it turn cancelled, and
check in Redis that the run's body really stopped.

Skips loudly without ``/usr/bin/chromium`` (``apt-get install chromium``; .ci/run installs
it); fails under ``CI=true``. ``pytest --dashboard-screenshot docs/images/dashboard.png``
also saves a screenshot of the page (the one in the README).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from sdk import Client, Event
from sdk.keys import Keys
from sdk.scripts import Registered, RegisterRequest
from sdk.store import RunStore
from tests.helpers import observed, run_of, wait_for_observation, wait_for_status
from tests.processes import ProcessHandle, start_broker, start_worker

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"


def chromium() -> str:
    """The system browser's path; skip loudly without it (on CI, fail)."""
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    reason = ""
    if path is None:
        reason = (
            "chromium not installed: apt-get install -y --no-install-recommends chromium"
            " (Debian) to run this test; .ci/run installs it"
        )
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            reason = "playwright not installed: pip install -e '.[dev]'"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, yet CI=true: CI must run it")
        pytest.skip(reason)
    assert path is not None
    return path


@pytest.fixture
def processes(redis_url: str, namespace: str) -> Iterator[str]:
    broker, http = start_broker(redis_url, namespace)
    worker: ProcessHandle | None = None
    try:
        worker = start_worker(redis_url, namespace, shutdown_timeout="0.2")
        yield http
    finally:
        if worker is not None:
            assert worker.terminate() == 0, worker.output
        assert broker.terminate() == 0, broker.output


@pytest.fixture
async def page(processes: str) -> AsyncIterator[Any]:
    executable = chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            # As root (containers, CI) Chromium refuses to start with its sandbox.
            args=["--no-sandbox"] if os.geteuid() == 0 else [],
        )
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 900})
            tab = await context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda error: errors.append(str(error)))
            tab.on(
                "console",
                lambda message: errors.append(message.text) if message.type == "error" else None,
            )
            await tab.goto(processes)
            yield tab
            assert errors == [], errors
        finally:
            await browser.close()


async def register_long_named_run(redis: Redis, namespace: str) -> str:
    """A running run whose ids are as long as they may be, and its trigger's data long."""
    store = RunStore(redis, Keys(namespace))
    run_id = "long-" + "r" * 100
    registration = await store.register(
        RegisterRequest(
            run_id=run_id,
            app_id="a" * 128,
            function_id="f" * 128,
            config_hash="c",
            worker_id="w" * 128,
            event=Event(name="long/" + "n" * 200, data={"blob": "x" * 2000}, id="1-0"),
            entries=[],
        )
    )
    assert isinstance(registration, Registered)
    return run_id


async def test_press_cancel_and_watch_the_run_stop(
    page: Any,
    client: Client,
    redis: Redis,
    namespace: str,
    request: pytest.FixtureRequest,
) -> None:
    from playwright.async_api import expect

    await expect(page.locator("#live")).to_contain_text("live")
    # Started after the page opened: it appears without a reload.
    done = await run_of(
        client, await client.send("report/generate.requested", {"reportId": "r0", "seconds": 0})
    )
    target = await run_of(
        client, await client.send("report/generate.requested", {"reportId": "r1"})
    )
    other = await run_of(client, await client.send("report/generate.requested", {"reportId": "r2"}))
    await wait_for_observation(redis, namespace, "r1", "started")
    await wait_for_status(client, done, "completed")
    await client.send("report/cancel.requested", {"reportId": "r9"})  # no such run yet

    row = page.locator(f'tr[data-run="{target}"]')
    await expect(row).to_have_attribute("data-status", "running")
    await expect(row).to_contain_text("report/generate.requested")
    await expect(row).to_contain_text('"reportId":"r1"')
    await expect(page.locator(f'tr[data-run="{done}"]')).to_have_attribute(
        "data-status", "completed"
    )

    await row.locator("button.cancel").click()
    await expect(page.locator("#toast")).to_contain_text("signalled: running → cancelling")
    await expect(row).to_have_attribute("data-status", "cancelled")
    await expect(row).to_contain_text("cancelled from the dashboard")
    await expect(row).to_contain_text("after the cancel")  # its cancel latency
    await expect(row.locator("button.cancel")).to_have_count(0)

    # It really stopped: its body saw the cancellation, in the middle of a 60 s call.
    seen = await wait_for_observation(redis, namespace, "r1", "cancelled", timeout=5)
    assert seen["exception"] == "asyncio.exceptions.CancelledError"
    info = await wait_for_status(client, target, "cancelled")
    assert (info.cancelled_by, info.cancel_reason) == ("api", "cancelled from the dashboard")
    untouched = await client.get_run(other)
    assert untouched is not None
    assert untouched.status == "running"
    assert [o["what"] for o in await observed(redis, namespace, "r2")] == ["started"]
    await expect(page.locator(f'tr[data-run="{other}"]')).to_have_attribute(
        "data-status", "running"
    )

    # The charts: the cancelled run is in this minute's bar, its latency a point.
    await expect(page.locator("#chart-runs rect.bar-cancelled")).to_have_count(1)
    await expect(page.locator("#chart-latency circle.dot-p50")).to_have_count(1)
    await expect(page.locator("#activity-summary")).to_contain_text("1 cancelled")

    # The other two panels, live too.
    await expect(page.locator('[data-function="reports/generate-report"]')).to_contain_text(
        "report/cancel.requested · match data.reportId"
    )
    await expect(page.locator('tr[data-decision="tombstoned"]')).to_contain_text(
        "report/cancel.requested"
    )

    screenshot = request.config.getoption("--dashboard-screenshot")
    if screenshot:
        # A cancel event matched by a rule too, for a fuller picture.
        await client.send("report/cancel.requested", {"reportId": "r2"})
        await wait_for_status(client, other, "cancelled")
        await client.send("report/generate.requested", {"reportId": "r3"})
        await expect(page.locator('tr[data-decision="matched"]')).to_have_count(1)
        await expect(page.locator('tr[data-status="running"]')).to_have_count(1)
        toast = page.locator("#toast")
        if await toast.is_visible():
            await toast.click()  # dismissed, so that it hides nothing
        await expect(toast).to_be_hidden()
        path = Path(screenshot)
        path.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(path), full_page=True)


async def test_long_names_wrap_and_cancel_stays_in_view(
    page: Any, redis: Redis, namespace: str
) -> None:
    """Hostile names: 128 unbroken characters in the app, function and worker ids, and 2 KB
    of unbroken data. They wrap (or are cut) in their cells: at 1400 px the page does not
    scroll sideways and the row's Cancel button is in view."""
    from playwright.async_api import expect

    long_run = await register_long_named_run(redis, namespace)
    long_row = page.locator(f'tr[data-run="{long_run}"]')
    await expect(long_row).to_have_attribute("data-status", "running")
    box = await long_row.locator("button.cancel").bounding_box()
    assert box is not None
    assert box["x"] + box["width"] <= 1400, box
    await long_row.locator("button.cancel").click()  # its result line wraps too
    await expect(long_row.locator(".result")).to_contain_text("signalled")
    # (What overflows, if anything: the failure says.)
    wide = await page.evaluate(
        "[...document.querySelectorAll('main *')].filter(e => e.scrollWidth > e.clientWidth + 2"
        " && getComputedStyle(e).overflowX === 'visible').map(e => e.tagName + '.' + e.className)"
    )
    assert await page.evaluate("document.documentElement.scrollWidth") <= 1400, wide
