"""The page of `pulsepipe live`: an aiohttp server on its own thread, fed by the frame loop.

    board = Board()                                   # what the frame loop publishes, bounded
    server = PageServer(board, host="127.0.0.1", port=8765)
    print(server.url)                                 # port 0 picks a free one
    board.push_sample(t, bvp, face, latency)          # per frame; cheap, never waits for a client
    server.close()

Routes: `/` the page (pipelines/live_page/), `/events` server-sent events (JSON: new samples and the
status, sent at most every SEND_S), `/preview.jpg` the latest small preview frame.
"""
from __future__ import annotations

import asyncio
import collections
import json
import math
import threading
from importlib import resources

import numpy as np
from aiohttp import web

SEND_S = 0.04  # a page update at most every 40 ms: 25 per second, a batch of frames each
KEEP_SAMPLES = 1024  # samples a client that falls behind can still catch up on (about 30 s at 30 fps)
LATENCY_FRAMES = 60  # the page shows each stage's median over the last this many frames
PAGE_FILES = {"/": ("index.html", "text/html"), "/live.js": ("live.js", "text/javascript"),
              "/live.css": ("live.css", "text/css")}


class Board:
    """What the page shows, written by the frame loop and read by the server thread: bounded deques and the
    latest values, so a slow or absent client never holds frames back or memory up."""

    def __init__(self):
        self._lock = threading.Lock()
        self._samples: collections.deque = collections.deque(maxlen=KEEP_SAMPLES)  # (seq, t, bvp, face)
        self._latency: collections.deque = collections.deque(maxlen=LATENCY_FRAMES)  # (decode, face, model, total)
        self._seq = 0
        self.status: dict = {}  # latest heart rate, quality, face box, counters (replaced whole, never mutated)
        self.preview: bytes | None = None  # JPEG
        self.closed = False

    def push_sample(self, t: float, bvp: float, face: bool, latency_s: tuple[float, float, float, float]) -> None:
        with self._lock:
            self._seq += 1
            self._samples.append((self._seq, t, bvp, face))
            self._latency.append(latency_s)

    def since(self, seq: int) -> tuple[int, list, dict]:
        """(newest seq, samples after `seq` as [t, bvp or None, face], status with stage latency medians)."""
        with self._lock:
            samples = [s for s in self._samples if s[0] > seq]
            latency = np.median(np.array(self._latency), axis=0) if self._latency else None
            newest = self._seq
        status = dict(self.status)
        if latency is not None:
            status["latency_ms"] = dict(zip(("decode", "face", "model", "total"), np.round(latency * 1e3, 2).tolist()))
        return newest, [[round(t, 4), None if math.isnan(b) else round(b, 5), int(f)] for _, t, b, f in samples], status


class PageServer:
    """The page's server, on a daemon thread with its own event loop; `url` once it listens."""

    def __init__(self, board: Board, host: str = "127.0.0.1", port: int = 8765):
        self.board = board
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, args=(host, port), name="live-page", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def _serve(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = web.AppRunner(self._app(), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, host, port, shutdown_timeout=0.5)
            self._loop.run_until_complete(site.start())
            self.host, self.port = self._runner.addresses[0][:2]  # the port the OS gave, for port 0
            shown = f"[{self.host}]" if ":" in self.host else self.host
            self.url = f"http://{shown}:{self.port}/"
        except BaseException as e:  # noqa: BLE001 - reported to the caller's thread
            self._error = e
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/events", self._events)
        app.router.add_get("/preview.jpg", self._preview)
        for route in PAGE_FILES:
            app.router.add_get(route, self._page_file)
        return app

    async def _page_file(self, request: web.Request) -> web.Response:
        name, kind = PAGE_FILES[request.path]
        text = resources.files("pipelines").joinpath("live_page", name).read_text()
        return web.Response(text=text, content_type=kind)

    async def _preview(self, request: web.Request) -> web.Response:
        if self.board.preview is None:
            raise web.HTTPNotFound()
        return web.Response(body=self.board.preview, content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        seq = 0
        try:
            while not self.board.closed:
                newest, samples, status = self.board.since(seq)
                if newest != seq or not seq:
                    seq = newest
                    await response.write(f"data: {json.dumps({'samples': samples, 'status': status})}\n\n".encode())
                await asyncio.sleep(SEND_S)
            await response.write(b"event: end\ndata: {}\n\n")
        except (ConnectionResetError, asyncio.CancelledError):  # the page was closed
            pass
        return response

    def close(self) -> None:
        self.board.closed = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
