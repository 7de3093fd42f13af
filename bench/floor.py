"""The floor of corral's benchmark: bare nats-py doing only the durable hops.

    python bench/floor.py --conversations 300

A conversation of the CS-4 workload makes eight durable hops on its critical path, each
one a JetStream publish awaited until the stream acknowledges it (``sync_interval:
always``: after an fsync), consumed by another process through a durable pull consumer
and acked after the next hop's publish was acknowledged::

    1 start      client -> router       floor.in.<conv>
    2 task a     router -> agent a      floor.agent.a.inbox
    3 output a   agent a -> router      floor.from.a.out
    4 task b     router -> agent b      floor.agent.b.inbox
    5 output b   agent b -> router      floor.from.b.out
    6 task c     router -> agent c      floor.agent.c.inbox
    7 reply c    agent c -> router      floor.from.c.out
    8 end        router -> client       floor.out.<conv> (stored; read by core NATS)

(corral makes the same eight: hops 3, 5 and 7 are requests the supervisor answers once
it has committed them in PostgreSQL, the agent holding its task until then; the floor
stores them in JetStream instead.) The floor runs exactly these hops between the same
kinds of separate OS processes (one
router standing in for the supervisor, three agents) with corral's stream and consumer
settings, on a nats-server configured like corral's embedded one, and does nothing else:
no model, no policy, no PostgreSQL, no tracing. Whatever corral spends beyond the floor
is the price of what it adds; the floor is what any system making the same durability
promise over NATS would at least pay.

Each process is ``python bench/floor.py serve --role router|agent --name <x> --url <url>``;
it stops cleanly on SIGTERM (or SIGINT) and when its stdin reaches end of file, so it
does not outlive a parent that died.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
sys.path.insert(0, str(REPO))

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

if TYPE_CHECKING:
    from bench._phases import RunFigures, Sizes

logger = logging.getLogger("floor")

HOPS = 8
"""Durable hops on a conversation's critical path, as in corral's benchmark workload
(each stored before its sender lets go: in JetStream, or for corral's outputs in
PostgreSQL)."""
HOP_NAMES: tuple[str, ...] = (
    "start",
    "task a",
    "output a",
    "task b",
    "output b",
    "task c",
    "reply c",
    "end",
)

AGENTS: tuple[str, ...] = ("a", "b", "c")
"""The agents a conversation passes, in order."""

WORK_STREAM = "FLOOR_WORK"
EVENTS_STREAM = "FLOOR_EVENTS"
ROUTER_DURABLE = "floor-router"
READY_SUBJECT = "floor.ready"
MSG_ID = "Nats-Msg-Id"

# Mirrors of bus/_topology.py (TopologyConfig defaults) and bus/_consumer.py.
DUPLICATE_WINDOW_S = 120.0
EVENTS_MAX_AGE_S = 7 * 24 * 3600.0
ACK_WAIT_S = 30.0
MAX_DELIVER = 10
MAX_ACK_PENDING = 1000
FETCH_TIMEOUT_S = 1.0
ROUTER_IN_FLIGHT = 64
AGENT_IN_FLIGHT = 32
PUBLISH_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 10.0

READY_TIMEOUT_S = 30.0
CONVERSATION_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

_QUESTION = "Where is my refund for order 2001? It was approved ten days ago."


def start_subject(conversation: str) -> str:
    return f"floor.in.{conversation}"


def inbox_subject(agent: str) -> str:
    return f"floor.agent.{agent}.inbox"


def output_subject(agent: str) -> str:
    return f"floor.from.{agent}.out"


def end_subject(conversation: str) -> str:
    return f"floor.out.{conversation}"


def agent_durable(agent: str) -> str:
    return f"floor-agent-{agent}"


class Hop(msgspec.Struct, frozen=True, kw_only=True):
    """Every floor message (~150 bytes of JSON): where the conversation is and who it passed."""

    conversation: str
    step: int
    """1-based number of this hop on the critical path (``HOPS`` for the end)."""
    kind: str
    """One of ``start``, ``task``, ``output``, ``end``."""
    agent: str = ""
    """The agent a task is for, or that wrote an output."""
    path: list[str] = msgspec.field(default_factory=list)
    """Agents passed so far, in order."""
    text: str = ""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Hop).decode


# --------------------------------------------------------------------------- topology


def _streams() -> list[StreamConfig]:
    return [
        StreamConfig(
            name=WORK_STREAM,
            subjects=["floor.in.>", "floor.agent.*.inbox", "floor.from.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=1,
            duplicate_window=DUPLICATE_WINDOW_S,
        ),
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=["floor.out.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=1,
            max_age=EVENTS_MAX_AGE_S,
            duplicate_window=DUPLICATE_WINDOW_S,
        ),
    ]


def _consumer(durable: str, filters: list[str]) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_deliver=MAX_DELIVER,
        max_ack_pending=MAX_ACK_PENDING,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
    )


async def ensure_topology(js: JetStreamContext) -> None:
    """Create (or update) both streams and the four durable consumers; idempotent."""
    for stream in _streams():
        try:
            await js.stream_info(stream.name or "")
        except NotFoundError:
            await js.add_stream(stream)
        else:
            await js.update_stream(stream)
    await js.add_consumer(WORK_STREAM, _consumer(ROUTER_DURABLE, ["floor.in.>", "floor.from.>"]))
    for agent in AGENTS:
        await js.add_consumer(WORK_STREAM, _consumer(agent_durable(agent), [inbox_subject(agent)]))


# --------------------------------------------------------------------------- serving


async def _log_error(exc: Exception) -> None:
    logger.warning("NATS: %s", exc)


async def _publish(js: JetStreamContext, subject: str, hop: Hop, msg_id: str) -> PubAck:
    return await js.publish(subject, _encode(hop), timeout=PUBLISH_TIMEOUT_S, headers={MSG_ID: msg_id})


def _router(js: JetStreamContext) -> Callable[[Msg], Awaitable[None]]:
    """The supervisor's stand-in: start -> task a; output x -> task for the next, or end."""

    async def handle(msg: Msg) -> None:
        hop = _decode(msg.data)
        conv = hop.conversation
        if hop.kind == "start":
            following = AGENTS[0]
        elif hop.kind == "output" and hop.agent in AGENTS:
            index = AGENTS.index(hop.agent) + 1
            following = AGENTS[index] if index < len(AGENTS) else ""
        else:
            raise ValueError(f"router cannot route a {hop.kind!r} from {hop.agent!r} on {msg.subject}")
        step = hop.step + 1
        if following:
            task = Hop(
                conversation=conv, step=step, kind="task", agent=following, path=hop.path, text=hop.text
            )
            await _publish(js, inbox_subject(following), task, f"{conv}-task-{following}")
        else:
            end = Hop(conversation=conv, step=step, kind="end", path=hop.path, text=hop.text)
            await _publish(js, end_subject(conv), end, f"{conv}-end")
        await msg.ack()

    return handle


def _agent(js: JetStreamContext, name: str) -> Callable[[Msg], Awaitable[None]]:
    """An agent that does no work: it signs the path and hands the task back to the router."""

    async def handle(msg: Msg) -> None:
        hop = _decode(msg.data)
        if hop.kind != "task" or hop.agent != name:
            raise ValueError(f"agent {name} got a {hop.kind!r} for {hop.agent!r} on {msg.subject}")
        conv = hop.conversation
        out = Hop(
            conversation=conv,
            step=hop.step + 1,
            kind="output",
            agent=name,
            path=[*hop.path, name],
            text=f"Agent {name} read the order and passes the conversation on.",
        )
        await _publish(js, output_subject(name), out, f"{conv}-out-{name}")
        await msg.ack()

    return handle


async def _consume(
    js: JetStreamContext,
    durable: str,
    max_in_flight: int,
    handle: Callable[[Msg], Awaitable[None]],
    stopping: asyncio.Event,
    ready: Callable[[], Awaitable[None]],
) -> None:
    """bus/_consumer.py's loop: fetch up to the free slots, one task per message."""
    sub = await js.pull_subscribe_bind(durable=durable, stream=WORK_STREAM)
    await ready()
    tasks: set[asyncio.Task[None]] = set()
    refill_at = max(1, max_in_flight // 4)

    async def deliver(msg: Msg) -> None:
        try:
            await handle(msg)
        except Exception:
            # Left unacked: JetStream redelivers it after ack_wait.
            logger.exception("could not handle a message on %s", msg.subject)

    try:
        while not stopping.is_set():
            free = max_in_flight - len(tasks)
            if free < refill_at and tasks:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await sub.fetch(batch=free, timeout=FETCH_TIMEOUT_S)
            except TimeoutError:  # nats.errors.TimeoutError and FetchTimeoutError derive from it
                continue
            except Exception as exc:
                logger.warning("fetch from %s failed: %s; retrying", durable, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 1.0)
                continue
            for msg in msgs:
                task = asyncio.create_task(deliver(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _watch_stdin(stopping: asyncio.Event) -> None:
    """Stop when stdin reaches end of file: the parent closed it, or died."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass
    stopping.set()


async def serve(role: str, name: str, url: str) -> None:
    """Run one floor process until SIGTERM, SIGINT or end of stdin."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    watcher = asyncio.create_task(_watch_stdin(stopping))
    nc = await nats.connect(
        url,
        name=f"floor {role} {name}",
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        drain_timeout=5,
        error_cb=_log_error,
    )
    js = nc.jetstream()
    try:
        if role == "router":
            durable, in_flight, handle = ROUTER_DURABLE, ROUTER_IN_FLIGHT, _router(js)
        else:
            durable, in_flight, handle = agent_durable(name), AGENT_IN_FLIGHT, _agent(js, name)

        async def ready() -> None:
            await nc.publish(READY_SUBJECT, process_label(role, name).encode())
            await nc.flush()

        await _consume(js, durable, in_flight, handle, stopping, ready)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        with contextlib.suppress(Exception):
            await nc.drain()


# --------------------------------------------------------------------------- the caller's side


class FloorError(RuntimeError):
    """A floor process did not start, or a conversation did not end as it should."""


PROCESSES: tuple[tuple[str, str], ...] = (("router", "router"), *(("agent", agent) for agent in AGENTS))
"""(role, name) of every serving process."""


def process_label(role: str, name: str) -> str:
    """``floor router``, ``floor agent a``, ...: the key of ``Floor.pids()``."""
    return "floor router" if role == "router" else f"floor {role} {name}"


class Floor:
    """The floor's four processes on a given nats-server, and a client to converse through it.

    Args:
        nats_url: The server (JetStream enabled); the caller starts and stops it.
        workdir: Where each process's stderr log goes (``floor-<name>.log``).
    """

    def __init__(self, nats_url: str, workdir: Path) -> None:
        self.nats_url = nats_url
        self.workdir = workdir
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._waiting: dict[str, asyncio.Future[Hop]] = {}
        self._stopped = False

    async def start(self) -> None:
        """Create the streams and consumers, start the processes, wait until each is fetching.

        Raises:
            FloorError: if a process exits or is not ready within 30 s (with its log's tail).
        """
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._nc = nc = await nats.connect(
            self.nats_url, name="floor client", drain_timeout=5, error_cb=_log_error
        )
        self._js = nc.jetstream()
        await ensure_topology(self._js)
        await nc.subscribe("floor.out.>", cb=self._on_end)

        expected = {process_label(role, name) for role, name in PROCESSES}
        ready: set[str] = set()
        all_ready = asyncio.Event()

        async def on_ready(msg: Msg) -> None:
            ready.add(msg.data.decode())
            if ready >= expected:
                all_ready.set()

        ready_sub = await nc.subscribe(READY_SUBJECT, cb=on_ready)
        await nc.flush()  # the server has both subscriptions before any process can publish
        for role, name in PROCESSES:
            with (self.workdir / f"floor-{name}.log").open("ab") as log:
                self._processes[process_label(role, name)] = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(SCRIPT),
                    "serve",
                    "--role",
                    role,
                    "--name",
                    name,
                    "--url",
                    self.nats_url,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )

        waiter = asyncio.create_task(all_ready.wait())
        exits = {asyncio.create_task(process.wait()): label for label, process in self._processes.items()}
        try:
            done, _ = await asyncio.wait(
                {waiter, *exits}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (waiter, *exits):
                task.cancel()
        if not all_ready.is_set():
            exited = [exits[task] for task in done if task in exits]
            problem = f"{', '.join(exited)} exited" if exited else f"not ready after {READY_TIMEOUT_S:.0f} s"
            missing = sorted(expected - ready)
            tails = "\n".join(self._log_tail(label) for label in (exited or missing))
            raise FloorError(f"floor processes did not start ({problem}; waiting for {missing}):\n{tails}")
        await ready_sub.unsubscribe()

    def _log_tail(self, label: str) -> str:
        log = self.workdir / f"floor-{label.rsplit(' ', 1)[-1]}.log"
        try:
            return f"--- {log}\n{log.read_text(errors='replace')[-2000:]}"
        except OSError:
            return f"--- {log}: missing"

    async def _on_end(self, msg: Msg) -> None:
        conversation = msg.subject.rsplit(".", 1)[-1]
        future = self._waiting.get(conversation)
        if future is None or future.done():
            return
        try:
            future.set_result(_decode(msg.data))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            future.set_exception(FloorError(f"conversation {conversation}: undecodable end: {exc}"))

    async def converse(self, n: int) -> None:
        """Run conversation ``n`` end to end and check it passed a, b and c in order.

        Raises:
            FloorError: if the end message is not the one expected.
            TimeoutError: if it did not end within 30 s.
        """
        if self._js is None or self._stopped:
            raise FloorError("the floor is not running")
        conversation = f"floor-{n}"
        future: asyncio.Future[Hop] = asyncio.get_running_loop().create_future()
        self._waiting[conversation] = future
        try:
            async with asyncio.timeout(CONVERSATION_TIMEOUT_S) as deadline:
                start = Hop(conversation=conversation, step=1, kind="start", text=_QUESTION)
                ack = await _publish(self._js, start_subject(conversation), start, conversation)
                if ack.duplicate:
                    raise FloorError(
                        f"conversation {conversation} was already started (within the duplicate window)"
                    )
                end = await future
        except TimeoutError:
            if not deadline.expired():
                raise  # the publish was not acknowledged in time
            raise TimeoutError(
                f"conversation {conversation} did not end within {CONVERSATION_TIMEOUT_S:.0f} s"
            ) from None
        finally:
            del self._waiting[conversation]
        if (end.conversation, end.kind, end.step, end.path) != (conversation, "end", HOPS, list(AGENTS)):
            raise FloorError(f"conversation {conversation} ended wrong: {end}")

    def pids(self) -> dict[str, int]:
        """Pid of each floor process, keyed ``floor router``, ``floor agent a``, ..."""
        return {label: process.pid for label, process in self._processes.items()}

    async def stop(self) -> None:
        """SIGTERM the processes (each finishes in-flight work and exits 0), then close the client.

        A process still running after 10 s is killed. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        await asyncio.gather(*(self._end(label, process) for label, process in self._processes.items()))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(FloorError("the floor stopped"))
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _end(self, label: str, process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            logger.warning("%s did not stop within %.0f s; killing it", label, STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return
        if process.returncode != 0:
            logger.warning("%s exited with %s; see %s", label, process.returncode, self._log_tail(label))


# --------------------------------------------------------------------------- standalone


async def _bench(nats_url: str, nats_pid: int, workdir: Path, sizes: Sizes) -> RunFigures:
    from bench._measure import ProcessGroup
    from bench._phases import run_phases

    floor = Floor(nats_url, workdir)
    await floor.start()
    try:
        group = ProcessGroup({**floor.pids(), "nats-server": nats_pid})
        return await run_phases(floor.converse, group, sizes)
    finally:
        await floor.stop()


def _report(figures: RunFigures) -> None:
    for name, phase in (("sequential", figures.sequential), ("concurrent", figures.concurrent)):
        print(
            f"{name:<10} {phase.conversations:>5} conv"
            f"  p50 {phase.p50_ms:7.2f} ms  p99 {phase.p99_ms:7.2f} ms"
            f"  {phase.per_second:7.1f} conv/s  CPU {phase.cpu_ms_per_conversation:6.2f} ms/conv"
            f"  PSS {phase.pss_mb:6.1f} MB"
        )
        by_process = "  ".join(f"{label} {ms:.2f}" for label, ms in phase.cpu_ms_by_process.items())
        print(f"{'':<10} CPU ms/conv by process: {by_process}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--conversations",
        "--sequential",
        dest="sequential",
        type=int,
        default=300,
        help="conversations of the sequential phase (default 300)",
    )
    parser.add_argument("--concurrent", type=int, default=2000, help="conversations of the concurrent phase")
    parser.add_argument("--in-flight", type=int, default=200, help="concurrent phase: conversations at once")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up conversations (10 at once)")
    commands = parser.add_subparsers(dest="command")
    serving = commands.add_parser("serve", help="run one floor process (Floor.start does this)")
    serving.add_argument("--role", choices=("router", "agent"), required=True)
    serving.add_argument("--name", required=True)
    serving.add_argument("--url", required=True)
    args = parser.parse_args(argv)

    if args.command == "serve":
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        # The event loop corral's processes run on (uvloop where installed), so the two
        # differ only in what corral does, not in how it waits.
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(args.role, args.name, args.url))
        else:
            uvloop.run(serve(args.role, args.name, args.url))
        return

    from bench._phases import Sizes
    from corral.supervisor import EmbeddedNats

    logging.basicConfig(level=logging.WARNING)
    sizes = Sizes(
        warmup=args.warmup,
        sequential=args.sequential,
        concurrent=args.concurrent,
        concurrent_in_flight=args.in_flight,
    )
    with tempfile.TemporaryDirectory(prefix="corral-floor-") as tmp:
        server = EmbeddedNats(Path(tmp) / "nats")
        server.start()
        try:
            assert server.process is not None
            figures = asyncio.run(_bench(server.url, server.process.pid, Path(tmp) / "floor", sizes))
        finally:
            server.stop()
    print(f"floor: {HOPS} durable hops per conversation ({', '.join(HOP_NAMES)})")
    _report(figures)


if __name__ == "__main__":
    main()
