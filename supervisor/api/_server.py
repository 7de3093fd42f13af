"""The API process: uvicorn serving the app, as a corral ``Service`` (it announces itself
to ``corral up`` once it listens, and stops on ``shutdown()``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn

from corral.bus import Bus, Service
from corral.supervisor.api._app import Api, ApiSettings

logger = logging.getLogger(__name__)


class ApiServer(Service):
    """Serve the API on ``host``:``port`` until ``shutdown()``.

    Args:
        bus: A bus connection with the API's identity.
        settings: Limits and rates.
        host: The address to listen on (loopback by default: put a TLS proxy in front).
        port: The port.
    """

    def __init__(self, bus: Bus, settings: ApiSettings, *, host: str, port: int) -> None:
        super().__init__()
        app = Api(bus, settings).app()
        # Keep-alive well past a client pool's own expiry (httpx: 5 s): the client closes an
        # idle connection first, instead of reusing one the server is closing under it.
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            loop="none",
            timeout_keep_alive=75,
        )
        self._server = uvicorn.Server(config)
        self._host, self._port = host, port

    async def _serve(self) -> None:
        serving = asyncio.create_task(self._server.serve(), name="corral-api")
        try:
            while not self._server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has no event
                await asyncio.sleep(0.02)
            if serving.done():
                serving.result()  # it could not bind: say why
                return
            logger.info("API serving on http://%s:%d", self._host, self._port)
            self._started.set()
            stopping = asyncio.create_task(self._stopping.wait())
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
        finally:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await serving
