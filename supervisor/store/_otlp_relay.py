"""Every process's spans, as ``SpanWriter`` received them, on to an OTLP/HTTP collector,
through an export process of the supervisor's own.

Encoding spans for OTLP is CPU work (the SDK's encoder takes tens of microseconds a span).
Done in the supervisor, it took the interpreter from the supervisor's event loop for tens of
milliseconds at every export, and doubled CS-4's sequential p99 once a collector was set.
So the supervisor only writes each span message it stored, as it arrived, down a pipe to a
child (``corral.supervisor.store._otlp_export``), which batches and exports them with
OpenTelemetry's own processor and exporter. The child gets neither the supervisor's NATS
seed nor its database's credentials, and stops at the end of its input, so it never
outlives the supervisor. A child that is behind (its pipe full past ``max_buffered``) or
gone costs spans, counted and logged, never the store; a child that died is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Mapping

from corral.bus._telemetry import otlp_endpoint
from corral.supervisor.store._otlp_export import frame

logger = logging.getLogger(__name__)

_RUNTIME = frozenset(
    {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
)
_NETWORK = frozenset(
    {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}
)
_NETWORK_PREFIXES = ("OTEL_", "SSL_CERT_", "LC_")


def export_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """What the export process gets of the supervisor's environment (an allow-list): what
    runs Python, the exporter's settings (``OTEL_*``) and what its HTTP client reads (proxies,
    certificate authorities). No NATS seed, database URL or provider key passes."""
    return {
        name: value
        for name, value in environment.items()
        if name in _RUNTIME or name.upper() in _NETWORK or name.startswith(_NETWORK_PREFIXES)
    }


class OtlpRelay:
    """The supervisor's side of its OTLP export process: ``start()``, ``put()``, ``close()``.

    Args:
        max_buffered: Bytes of span messages the pipe may hold before more are dropped.
        restart_after_s: How long after its last start a child that died is started again.
    """

    def __init__(self, *, max_buffered: int = 16 * 1024 * 1024, restart_after_s: float = 5.0) -> None:
        self._max_buffered = max_buffered
        self._restart_after_s = restart_after_s
        self._process: asyncio.subprocess.Process | None = None
        self._started_at = -restart_after_s
        self._starting: asyncio.Task[None] | None = None
        self._closing = False
        self.sent = 0
        """Spans written to the export process's input (those its pipe held when it died
        are lost)."""
        self.dropped = 0

    @classmethod
    def from_environment(cls) -> OtlpRelay | None:
        """A relay to the collector ``OTEL_EXPORTER_OTLP_ENDPOINT`` names; None if unset."""
        return cls() if otlp_endpoint() is not None else None

    async def start(self) -> None:
        """Start the export process (it imports the exporter on its own time)."""
        self._started_at = asyncio.get_running_loop().time()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "corral.supervisor.store._otlp_export",
                stdin=asyncio.subprocess.PIPE,
                env=export_environment(os.environ),
            )
        except OSError as exc:  # no process to be had now: spans are dropped until one is
            logger.warning("could not start the OTLP export process: %s", exc)

    def put(self, identity: str, data: bytes, spans: int) -> None:
        """Hand one span message of ``identity`` (holding ``spans`` spans) to the export
        process; dropped if it is behind or gone."""
        process = self._process
        stdin = process.stdin if process is not None else None
        if process is None or stdin is None or process.returncode is not None or stdin.is_closing():
            self._drop(spans, "the OTLP export process is not running")
            if not self._closing:
                self._restart(process)
            return
        if stdin.transport.get_write_buffer_size() > self._max_buffered:
            self._drop(spans, "the OTLP collector is behind")
            return
        try:
            stdin.write(frame(identity, data))
        except (OSError, RuntimeError) as exc:
            self._drop(spans, f"the OTLP export process is gone ({exc})")
            return
        self.sent += spans

    def _drop(self, spans: int, why: str) -> None:
        self.dropped += spans
        if self.dropped == spans or self.dropped % 10_000 < spans:
            logger.warning("%s: %d spans dropped so far", why, self.dropped)

    def _restart(self, process: asyncio.subprocess.Process | None) -> None:
        loop = asyncio.get_running_loop()
        if self._starting is not None and not self._starting.done():
            return
        if loop.time() - self._started_at < self._restart_after_s:
            return
        if process is not None:
            logger.warning("the OTLP export process exited (%s); starting it again", process.returncode)
        self._starting = asyncio.create_task(self.start())

    async def close(self, timeout_s: float = 9.0) -> None:
        """End the export process's input and wait for it to export what it holds (killed
        after ``timeout_s``: within the 10 s the supervisor is given to stop)."""
        self._closing = True
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        process = self._process
        if process is None or process.returncode is not None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                if process.stdin is not None:
                    with contextlib.suppress(OSError, RuntimeError):
                        await process.stdin.drain()
                    process.stdin.close()
                await process.wait()
        except TimeoutError:
            logger.warning("the OTLP export process did not finish in %.0f s; killing it", timeout_s)
            process.kill()
            await process.wait()
