"""Test helper: a page in headless Chromium driven over the DevTools protocol (evaluate, screenshot).

    async with ChromiumPage(binary, url, tmp_dir) as page:
        text = await page.evaluate("document.getElementById('hr').textContent")
        await page.screenshot("live.png")

Run as a script to take a screenshot of a running page: `python tests/chromium_page.py URL OUT.png [DELAY_S]`.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

BINARIES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    return next((path for name in BINARIES if (path := shutil.which(name))), None)


class ChromiumPage:
    def __init__(self, binary: str, url: str, profile_dir: str | Path, size: tuple[int, int] = (1280, 760)):
        self.binary, self.url, self.profile = binary, url, Path(profile_dir)
        self.size = size
        self._ids = itertools.count(1)

    async def __aenter__(self) -> ChromiumPage:
        self._proc = subprocess.Popen(
            [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as r:
            target = next(t for t in await r.json() if t["type"] == "page")
        self._ws = await self._http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Page.enable")
        await self.call("Page.navigate", url=self.url)
        return self

    async def call(self, method: str, **params) -> dict:
        msg_id = next(self._ids)
        await self._ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self._ws.receive_json(), timeout=30)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def screenshot(self, path: str | Path) -> None:
        data = await self.call("Page.captureScreenshot", format="png")
        Path(path).write_bytes(base64.b64decode(data["data"]))

    async def __aexit__(self, *exc) -> None:
        await self._ws.close()
        await self._http.close()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()


async def _screenshot(url: str, out: str, delay_s: float) -> None:
    with tempfile.TemporaryDirectory() as profile:
        async with ChromiumPage(find_chromium(), url, profile) as page:
            await asyncio.sleep(delay_s)
            await page.screenshot(out)


if __name__ == "__main__":
    asyncio.run(_screenshot(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 12.0))
