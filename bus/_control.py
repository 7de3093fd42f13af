"""Kill switches: a JetStream KV bucket every process watches.

Keys are ``agent.<name>`` and ``conversation.<id>``; a key that exists is a kill
switch that is on, with the reason as its value. Deleting the key turns it off. The
bucket is file-backed and replicated like the streams, so kills survive restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from corral.bus import subjects
from corral.bus._service import Service, Serving
from corral.bus.errors import BusError

logger = logging.getLogger(__name__)


class KillSwitch(msgspec.Struct, frozen=True, kw_only=True):
    """Why something was killed, by whom, and when (Unix seconds)."""

    reason: str
    by: str = ""
    at: float = 0.0


_decoder = msgspec.json.Decoder(KillSwitch)
_encoder = msgspec.json.Encoder()

KillTarget = Literal["agent", "conversation"]
OnChange = Callable[[KillTarget, str, KillSwitch | None], Awaitable[None]]


async def ensure_control_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """Create the kill-switch bucket if it is missing."""
    try:
        return await js.key_value(subjects.CONTROL_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(
                bucket=subjects.CONTROL_BUCKET, history=5, storage=StorageType.FILE, replicas=replicas
            )
        )


def _key(target: KillTarget, name: str) -> str:
    return (
        subjects.agent_control_key(name) if target == "agent" else (subjects.conversation_control_key(name))
    )


async def set_kill(js: JetStreamContext, target: KillTarget, name: str, reason: str, by: str = "") -> None:
    """Turn a kill switch on."""
    kv = await js.key_value(subjects.CONTROL_BUCKET)
    value = KillSwitch(reason=reason, by=by, at=time.time())
    await kv.put(_key(target, name), _encoder.encode(value))


async def clear_kill(js: JetStreamContext, target: KillTarget, name: str) -> bool:
    """Turn a kill switch off; False if it was not on."""
    kv = await js.key_value(subjects.CONTROL_BUCKET)
    try:
        entry = await kv.get(_key(target, name))
    except KeyNotFoundError:
        return False
    if entry.value is None:
        return False
    await kv.delete(_key(target, name))
    return True


async def list_kills(js: JetStreamContext) -> dict[str, KillSwitch]:
    """Every kill switch that is on, by key."""
    try:
        kv = await js.key_value(subjects.CONTROL_BUCKET)
    except BucketNotFoundError:
        return {}
    out: dict[str, KillSwitch] = {}
    with contextlib.suppress(Exception):  # an empty bucket raises NoKeysError
        for key in await kv.keys():
            with contextlib.suppress(KeyNotFoundError):
                entry = await kv.get(key)
                if entry.value:
                    out[key] = _decoder.decode(entry.value)
    return out


@dataclass
class ControlState:
    """The kill switches as last seen; kept current by ``watch()``."""

    agents: dict[str, KillSwitch]
    conversations: dict[str, KillSwitch]

    def agent_killed(self, name: str) -> KillSwitch | None:
        """The kill switch of an agent, if on."""
        return self.agents.get(name)

    def conversation_killed(self, conversation: str) -> KillSwitch | None:
        """The kill switch of a conversation, if on."""
        return self.conversations.get(conversation)


class ControlWatcher(Service):
    """Keep a ``ControlState`` current and call ``on_change`` for every switch flipped,
    until ``shutdown()`` (which returns once the watch has stopped).

    Args:
        js: JetStream context.
        on_change: Awaited for each switch, the ones already on at start included, so a
            process that was down when a switch flipped still acts on it.
        keys: Which keys to watch (agents watch only conversations).
    """

    def __init__(self, js: JetStreamContext, on_change: OnChange | None = None, keys: str = ">") -> None:
        super().__init__()
        self._js = js
        self._on_change = on_change
        self._keys = keys
        self.state = ControlState(agents={}, conversations={})
        self._ready = asyncio.Event()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Wait until the initial state was loaded."""
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def _serve(self) -> None:
        """Watch until ``shutdown()``.

        Raises:
            BusError: if the bucket does not exist or cannot be watched.
        """
        try:
            kv = await self._js.key_value(subjects.CONTROL_BUCKET)
            watcher = await kv.watch(self._keys)
        except Exception as exc:
            raise BusError(f"cannot watch {subjects.CONTROL_BUCKET}: {exc}") from exc
        self._started.set()
        try:
            while not self._stopping.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]
                except TimeoutError:
                    continue
                except Exception as exc:  # reconnecting; the ordered consumer resumes itself
                    logger.debug("control watch: %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), 0.5)
                    continue
                if entry is None:
                    self._ready.set()
                    continue
                await self._apply(entry.key, entry.value if entry.operation is None else None)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _apply(self, key: str, value: bytes | None) -> None:
        kind, _, name = key.partition(".")
        if kind not in ("agent", "conversation"):
            return
        target: KillTarget = "agent" if kind == "agent" else "conversation"
        table = self.state.agents if target == "agent" else self.state.conversations
        switch = _decoder.decode(value) if value else None
        if switch is None:
            if table.pop(name, None) is None:
                return
        else:
            table[name] = switch
        logger.info(
            "kill switch %s %s: %s", key, "on" if switch else "off", switch.reason if switch else "revived"
        )
        if self._on_change is not None:
            await self._on_change(target, name, switch)


async def serve_with_control(control: ControlWatcher, *services: Serving) -> None:
    """Run ``services`` once ``control`` has loaded the kill switches; stop all together
    when any of them stops.

    Raises:
        BusError: if the kill switches cannot be read.
    """
    watcher = asyncio.create_task(control.run(), name="control")
    ready = asyncio.create_task(control.wait_ready(timeout_s=30.0), name="control-ready")
    serving: list[asyncio.Task[None]] = []
    try:
        await asyncio.wait({watcher, ready}, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done():
            await watcher  # raises why the kill switches cannot be read
        await ready
        serving = [asyncio.create_task(service.run(), name=type(service).__name__) for service in services]
        done, _ = await asyncio.wait({watcher, *serving}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        # All told at once: each shutdown waits for its service, and their grace periods
        # overlap instead of adding up.
        await asyncio.gather(*(service.shutdown() for service in services), return_exceptions=True)
        await control.shutdown()
        ready.cancel()
        await asyncio.gather(watcher, ready, *serving, return_exceptions=True)
