"""One origin in front of the API and the realtime service, routed as the Kubernetes Ingress does
(deploy/k8s/base/ingress.yaml): ``/ws`` to the realtime service, everything else to the API.

The Host header is passed on, as ingress-nginx does, so the API sees the public host. While the realtime
service is down, ``/ws`` answers 502 like the Ingress controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import aiohttp
from aiohttp import web

from iot_testkit.processes import free_port

# Hop-by-hop headers stay with their connection; aiohttp sets the length of the body it sends itself.
_NOT_FORWARDED = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
    | {"content-length"}
)


class IngressProxy:
    """``with IngressProxy(api_port, realtime_port) as origin:`` serves ``origin`` until the block ends."""

    _session: aiohttp.ClientSession

    def __init__(self, api_port: int, realtime_port: int) -> None:
        self.api = f"http://127.0.0.1:{api_port}"
        self.realtime = f"ws://127.0.0.1:{realtime_port}/ws"
        self.port = free_port()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> str:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            self._session = session
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._route)
            runner = web.AppRunner(app, shutdown_timeout=1)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

    async def _route(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/ws":
            return await self._websocket(request)
        return await self._http(request)

    async def _http(self, request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        async with self._session.request(
            request.method,
            self.api + request.raw_path,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as upstream:
            response = web.Response(status=upstream.status, body=await upstream.read())
            for name, value in upstream.headers.items():
                if name.lower() not in _NOT_FORWARDED:
                    response.headers.add(name, value)
            return response

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        try:
            upstream = await self._session.ws_connect(
                f"{self.realtime}?{request.query_string}", origin=request.headers.get("Origin")
            )
        except (aiohttp.ClientError, OSError):
            return web.Response(status=502, text="realtime service unavailable")
        client = web.WebSocketResponse()
        await client.prepare(request)
        async with upstream:
            pumps = [
                asyncio.create_task(_pump(client, upstream)),
                asyncio.create_task(_pump(upstream, client)),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            # Each side learns how the other one closed (1001 when the realtime service stops).
            await client.close(code=upstream.close_code or 1001)
            await upstream.close(code=client.close_code or 1000)
        return client


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for message in source:
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
