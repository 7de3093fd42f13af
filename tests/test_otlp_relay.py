"""The supervisor's OTLP export process: every span message it is handed reaches the
collector once, as the process that sent it, nothing it holds is lost when the supervisor
closes its input, it holds none of the supervisor's secrets, and one that died is started
again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from corral.supervisor.store._otlp_relay import OtlpRelay
from tests.conftest import eventually
from tests.otlp_receiver import Receiver, otlp_receiver
from tests.span_records import span_message, span_record

TRACE = "ab" * 16


def _message(
    first: int, count: int, *, claims: str = "", attributes: dict[str, object] | None = None
) -> bytes:
    """A span message as a process publishes it (``claims``: the service it says it is)."""
    return span_message(
        *(
            span_record(
                f"{first + n + 1:016x}",
                trace_id=TRACE,
                name="chat support",
                attributes=attributes or {"gen_ai.operation.name": "chat"},
                service=claims,
            )
            for n in range(count)
        )
    )


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    with otlp_receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        yield receiver


def _span_ids(receiver: Receiver) -> list[int]:
    return sorted(int(span.span_id, 16) for span in receiver.of_trace(TRACE))


async def test_what_it_holds_reaches_the_collector_when_its_input_ends_each_once_as_its_sender(
    collector: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No batch is due before the input ends: only the close can have exported them.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    relay = OtlpRelay.from_environment()
    assert relay is not None
    await relay.start()
    for n in range(10):
        relay.put(f"agent-{n % 2}", _message(10 * n, 10, claims="corral-supervisor"), 10)
    assert relay.sent == 100
    await relay.close()
    assert _span_ids(collector) == list(range(1, 101))
    services = {span.service for span in collector.of_trace(TRACE)}
    assert services == {"corral-agent-0", "corral-agent-1"}  # not what the spans claim


async def test_spans_go_out_while_it_runs(collector: Receiver) -> None:
    relay = OtlpRelay()
    await relay.start()
    try:
        relay.put("router", _message(0, 3), 3)
        await eventually(lambda: len(collector.of_trace(TRACE)) == 3, message="the spans exported")
    finally:
        await relay.close()


async def test_it_gets_the_exporters_settings_and_none_of_the_supervisors_secrets(
    collector: Receiver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets = {
        "DATABASE_URL": "postgresql://corral:secret@127.0.0.1/corral",
        "CORRAL_CREDS": str(tmp_path / "supervisor.nk"),
        "CORRAL_STATE_DIR": str(tmp_path),
        "CORRAL_SUPERVISOR_PASSWORD": "secret",
        "OPENAI_API_KEY": "sk-secret",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=for-the-collector")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    relay = OtlpRelay()
    await relay.start()
    try:
        assert relay._process is not None
        environment = Path(f"/proc/{relay._process.pid}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0].decode() for entry in environment if entry}
        assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS", "HTTPS_PROXY"} <= names
        assert not names & set(secrets)
        assert names <= set(os.environ)  # nothing but what it was given
    finally:
        await relay.close()


async def test_what_the_collector_cannot_take_in_a_span_costs_only_that_value(
    collector: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value OTLP has no room for (a map, a list nested past protobuf's depth) is dropped
    from its span; the spans of the other processes in the same request are exported."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # one request, at the close
    nested: object = 1
    for _ in range(60):
        nested = [nested]
    relay = OtlpRelay()
    await relay.start()
    relay.put("agent-hostile", _message(0, 1, attributes={"deep": nested, "map": {"a": 1}, "ok": "yes"}), 1)
    relay.put("router", _message(1, 2), 2)
    await relay.close()
    assert _span_ids(collector) == [1, 2, 3]
    hostile = next(span for span in collector.of_trace(TRACE) if span.service == "corral-agent-hostile")
    assert hostile.attributes == {"deep": json.dumps(nested), "map": '{"a": 1}', "ok": "yes"}


async def _started_and_killed(relay: OtlpRelay) -> asyncio.subprocess.Process:
    await relay.start()
    process = relay._process
    assert process is not None
    process.kill()
    await process.wait()
    return process


async def test_a_process_that_died_costs_what_it_was_sent_meanwhile_and_is_started_again(
    collector: Receiver,
) -> None:
    relay = OtlpRelay(restart_after_s=0.0)
    first = await _started_and_killed(relay)
    try:
        relay.put("router", _message(0, 4), 4)  # nobody to take them
        assert relay.dropped == 4
        await eventually(
            lambda: relay._process is not first and relay._process is not None, message="a new process"
        )
        relay.put("router", _message(100, 2), 2)
        await eventually(lambda: len(collector.of_trace(TRACE)) == 2, message="the later spans exported")
        assert _span_ids(collector) == [101, 102]
    finally:
        await relay.close()


async def test_a_process_that_keeps_dying_is_not_started_again_at_once(collector: Receiver) -> None:
    relay = OtlpRelay(restart_after_s=600.0)
    first = await _started_and_killed(relay)
    try:
        relay.put("router", _message(0, 4), 4)
        assert relay.dropped == 4 and relay._starting is None and relay._process is first
    finally:
        await relay.close()


async def test_it_does_not_outlive_a_supervisor_that_was_killed(collector: Receiver) -> None:
    """Its input ends with its parent (the pipe closes): it exports what it holds and exits."""
    supervisor = (
        "import asyncio\n"
        "from corral.supervisor.store._otlp_relay import OtlpRelay\n"
        "async def main():\n"
        "    relay = OtlpRelay()\n"
        "    await relay.start()\n"
        "    relay.put('router', bytes.fromhex(input()), 1)\n"
        "    print(relay._process.pid, flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", supervisor, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert parent.stdin is not None and parent.stdout is not None
    parent.stdin.write(_message(0, 1).hex().encode() + b"\n")
    child = int(await parent.stdout.readline())
    parent.kill()  # as SIGKILL takes a supervisor: no close(), no goodbye
    await parent.wait()

    def gone() -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        return True

    await eventually(gone, message="the export process gone with its supervisor")
    assert _span_ids(collector) == [1]  # what it held went out first
