"""`corral demo`: start the team, send the sample conversations, check each outcome."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from corral.bus import ConversationEnded, ConversationWaiting, subjects
from corral.supervisor.cli._shared import ConfigOption, _connect, _load, _run, _setup_logging, app, console
from corral.supervisor.cli._stack import _with_stack
from corral.supervisor.cli._talk import _print_ended, _print_update
from corral.supervisor.stack._runtime import Runtime


@app.command()
def demo(
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option("--once", help="Exit after the samples")] = False,
    scenarios: Annotated[str | None, typer.Option(help="Scenarios file")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per conversation")] = 60.0,
) -> None:
    """Start the team, send the sample conversations, and print each path and reply."""
    settings = _load(config)
    _setup_logging(logging.WARNING)
    scenarios_file = Path(scenarios) if scenarios else settings.path.parent / "scenarios.yaml"
    samples = yaml.safe_load(scenarios_file.read_text())["conversations"]

    async def _samples(runtime: Runtime) -> int:
        from corral.supervisor.cli._operator import _decide
        from corral.supervisor.core._client import send_until_settled, watching

        bus = await _connect(settings, runtime.nats_url, subjects.DEFAULT_CLIENT, forever=False)
        failures = 0
        try:
            for sample in samples:
                console.print(f"\n[bold]{sample['name']}[/bold]: {sample['text']}")
                try:
                    settled = await send_until_settled(
                        bus,
                        sample["text"],
                        customer=sample.get("customer", ""),
                        timeout_s=timeout,
                        on_update=_print_update,
                    )
                    if isinstance(settled, ConversationWaiting):
                        # The demo plays the human: it approves, and the conversation resumes.
                        console.print(
                            f"  waiting for approval {settled.approval_id}; "
                            "approving it as the demo operator",
                            highlight=False,
                        )
                        async with watching(bus, settled.conversation, on_update=_print_update) as done:
                            await _decide(settings, settled.approval_id, True, "demo", "")
                            resumed = await asyncio.wait_for(done, timeout)
                        assert isinstance(resumed, ConversationEnded)
                        settled = resumed
                    assert isinstance(settled, ConversationEnded)
                    ended = settled
                except TimeoutError:
                    console.print(f"  [red]timed out after {timeout:.0f}s[/red]")
                    failures += 1
                    continue
                _print_ended(ended)
                problem = _check_expectation(ended, sample.get("expect", {}))
                if problem:
                    console.print(f"  [red]unexpected: {problem}[/red]")
                    failures += 1
                else:
                    console.print("  [green]as expected[/green]")
        finally:
            await bus.close()
        console.print(f"\n{len(samples) - failures}/{len(samples)} conversations ended as expected")
        if not once:
            return -1
        return 0 if failures == 0 else 1

    _run(_with_stack(settings, _samples))


def _check_expectation(ended: ConversationEnded, expect: dict[str, Any]) -> str | None:
    path = [hop.agent for hop in ended.path]
    if "status" in expect and ended.status != expect["status"]:
        return f"status {ended.status}, expected {expect['status']}"
    if "path" in expect and path != expect["path"]:
        return f"path {path}, expected {expect['path']}"
    if "reply_contains" in expect and expect["reply_contains"] not in (ended.reply or ""):
        return f"reply does not contain {expect['reply_contains']!r}"
    if "reason_contains" in expect and expect["reason_contains"] not in (ended.reason or ""):
        return f"reason does not contain {expect['reason_contains']!r}"
    return None
