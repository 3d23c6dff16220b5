"""The status page in a real browser: Debian's headless Chromium, driven by Playwright.

Playwright's own browser download is not used (nor reachable here): it drives
``/usr/bin/chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it) with a
fresh profile per test. Each test loads the page, makes a failover happen and waits, for
at most 2 s, for the DOM to show it: the open breaker and the request that failed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.auth import SESSION_COOKIE, AccessPolicy, digest
from tests.conftest import chat
from tests.fake_upstream import ok, rate_limited

CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOWN_WITHIN_MS = 2000  # how long the DOM may take to show what happened
ADMIN_KEY = "gw-status-page-admin-key-0123456789"
OPEN_CARD = '#chain li[data-provider="openai"][data-state="open"]'


class Browser:
    """One page in a fresh Chromium profile, with the console errors it logged."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.urls: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("request", lambda r: self.urls.append(r.url))

    async def wait(self, selector: str) -> Any:
        """The element, once it is in the DOM (at most :data:`SHOWN_WITHIN_MS`)."""
        return await self.page.wait_for_selector(selector, timeout=SHOWN_WITHIN_MS)

    async def live(self, url: str) -> None:
        """Open the page and wait until its event stream is connected."""
        await self.page.goto(url)
        await self.page.wait_for_selector("#conn.live", timeout=10_000)


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        pytest.skip("needs Debian's Chromium: apt-get install -y chromium")
    playwright = pytest.importorskip(
        "playwright.async_api", reason="needs Playwright: pip install -e '.[test]'"
    )
    async with playwright.async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield Browser(context.pages[0] if context.pages else await context.new_page())
        finally:
            await context.close()


async def showed_failover(browser: Browser, seq: int) -> None:
    """The DOM shows OpenAI's breaker open and request ``seq`` failing over to LM Studio."""
    await browser.wait(OPEN_CARD)
    row = await browser.wait(f'#requests tbody tr.failover[data-seq="{seq}"]')
    assert await row.eval_on_selector(".chain", "e => e.textContent") == (
        "OpenAI rate_limited \u2192 LM Studio ok"
    )
    assert await row.eval_on_selector(".provider", "e => e.textContent") == "LM Studio"
    first = await browser.wait("#transitions tbody tr:first-child")
    assert "OpenAI" in await first.text_content()
    assert "closed \u2192 open" in await first.text_content()
    served = await browser.wait('#chain li[data-provider="lmstudio"] .served')
    assert await served.text_content() == "served last"


async def test_page_shows_a_scripted_failover_live(upstreams, gateway, tmp_path):
    up1, up2 = await upstreams("openai"), await upstreams("lmstudio")
    up1.then(ok(), rate_limited(retry_after=30))
    client = await gateway(up1, up2, max_retries=0)
    async with chromium(tmp_path) as browser:
        await browser.live(str(client.make_url("/status")))
        await browser.wait('#chain li[data-provider="openai"][data-state="closed"]')

        resp = await client.post("/v1/chat/completions", json=chat())
        assert resp.headers["x-gateway-provider"] == "openai"
        await browser.wait('#requests tbody tr[data-seq="1"]:not(.failover)')

        resp = await client.post("/v1/chat/completions", json=chat(stream=True))
        assert resp.headers["x-gateway-failover"] == "true"
        await resp.read()
        await showed_failover(browser, 2)
        await browser.page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
        assert browser.errors == []
    assert (tmp_path / "status.png").stat().st_size > 10_000


async def test_page_asks_for_the_admin_key_once_and_keeps_a_session(upstreams, gateway, tmp_path):
    up = await upstreams("openai")
    client = await gateway(up, settings={"access": AccessPolicy(admin_key=digest(ADMIN_KEY))})
    async with chromium(tmp_path) as browser:
        page = browser.page
        await page.goto(str(client.make_url("/status")))
        await page.wait_for_selector("#key", state="visible", timeout=SHOWN_WITHIN_MS)
        assert await page.is_hidden("#live")
        await page.fill("#key", "not-the-key")
        await page.click("button[type=submit]")
        await page.wait_for_function(
            "document.getElementById('login-error').textContent.includes('not accepted')",
            timeout=SHOWN_WITHIN_MS,
        )
        await page.fill("#key", ADMIN_KEY)
        await page.click("button[type=submit]")
        await page.wait_for_selector("#conn.live", timeout=SHOWN_WITHIN_MS)
        assert await page.is_hidden("#login")

        (cookie,) = [c for c in await page.context.cookies() if c["name"] == SESSION_COOKIE]
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/status"
        assert ADMIN_KEY not in cookie["value"]
        assert await page.evaluate("document.cookie") == ""  # out of the page's scripts' reach
        assert await page.input_value("#key") == ""

        await page.reload()  # asked once: the session cookie lets it straight in
        await page.wait_for_selector("#conn.live", timeout=SHOWN_WITHIN_MS)
        assert await page.is_hidden("#login")
        assert not any(ADMIN_KEY in url or "not-the-key" in url for url in browser.urls)
        # The only errors: the refused session check on the first load and the wrong key.
        assert len(browser.errors) == 2
        assert all("401" in e for e in browser.errors), browser.errors


def _demo_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI", "LMSTUDIO", "OLLAMA", "GATEWAY", "FAILOVER"))
    }


async def test_demo_prints_its_status_page_which_shows_failover(tmp_path, unused_tcp_port):
    """``python -m gateway --demo`` names the page's URL; the page shows the demo's first
    request failing over (its flaky upstream answers it with a 429), and the gateway still
    stops at once with the page open."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "--demo", "--port", str(unused_tcp_port)),
        env=_demo_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    log: list[str] = []
    try:
        url = None
        async with asyncio.timeout(20):
            while url is None:
                line = (await proc.stdout.readline()).decode()
                assert line, "the demo exited: " + "".join(log)
                log.append(line)
                found = re.search(r"watch failover live at (\S+)", line)
                url = found.group(1) if found else None
        assert url == f"http://127.0.0.1:{unused_tcp_port}/status"

        async def drain() -> None:  # the demo keeps logging: never let its pipe fill
            while line := await proc.stdout.readline():  # type: ignore[union-attr]
                log.append(line.decode())

        reader = asyncio.create_task(drain())
        async with chromium(tmp_path) as browser:
            await browser.live(url)
            async with aiohttp.ClientSession() as session:
                base = url.removesuffix("/status")
                async with session.post(f"{base}/v1/chat/completions", json=chat()) as resp:
                    assert resp.headers["x-gateway-failover"] == "true"
                    await resp.read()
            await showed_failover(browser, 1)
            await browser.page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            assert browser.errors == []
            proc.send_signal(signal.SIGTERM)  # with the page's event stream still open
            async with asyncio.timeout(15):
                assert await proc.wait() == 0
        async with asyncio.timeout(5):
            await reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "shutting down" in "".join(log)
