"""`corral demo`: start the team in a state of its own, send the sample conversations, and
check each outcome exactly (status, path, tool decisions).

The demo's state is ``<state_dir>/demo``: its own embedded nats-server and PostgreSQL,
created afresh on every run, so its refunds never count toward the day of the team that
``corral up`` runs, and a second demo gives the first one's outcomes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.supervisor.cli._shared import (
    EXIT_CONFIG,
    ConfigOption,
    _connect,
    _load,
    _run,
    _setup_logging,
    app,
    console,
    err_console,
)
from corral.supervisor.cli._stack import _with_stack
from corral.supervisor.cli._talk import _print_ended, _print_update
from corral.supervisor.stack._runtime import Runtime

if TYPE_CHECKING:
    # What a command uses is imported when it runs: `corral --help` loads none of it.
    from corral.bus import Bus, ClientUpdate, ConversationEnded, ToolDecided
    from corral.supervisor.stack._settings import Settings

DEMO_STATE = "demo"
"""The demo's own state directory, under the team's ``state_dir``."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample conversation of ``scenarios.yaml`` and the outcome it must reach."""

    name: str
    text: str
    customer: str
    approve: bool
    expect: dict[str, Any]

    @classmethod
    def load_all(cls, path: Path) -> list[Sample]:
        """The samples of a scenarios file.

        Raises:
            ConfigError: the file is missing, is not YAML, or a sample lacks a field.
        """
        import yaml

        from corral.supervisor.errors import ConfigError

        try:
            document = yaml.safe_load(path.read_text())
            entries = document["conversations"]
            return [
                cls(
                    name=str(entry["name"]),
                    text=str(entry["text"]),
                    customer=str(entry.get("customer", "")),
                    approve=bool(entry.get("approve", False)),
                    expect=dict(entry.get("expect") or {}),
                )
                for entry in entries
            ]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path}: not a scenarios file ({type(exc).__name__}: {exc})", path=str(path)
            ) from exc


@app.command()
def demo(
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option("--once", help="Exit after the samples")] = False,
    scenarios: Annotated[str | None, typer.Option(help="Scenarios file")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per conversation")] = 60.0,
) -> None:
    """Start the team in a state of its own (<state_dir>/demo, new on every run), send the
    sample conversations, and check each one's status, path and tool decisions."""
    from corral.bus import subjects
    from corral.supervisor.errors import ConfigError

    settings = _demo_settings(_load(config))
    _setup_logging(logging.WARNING)
    scenarios_file = Path(scenarios) if scenarios else settings.path.parent / "scenarios.yaml"
    try:
        samples = Sample.load_all(scenarios_file)
    except ConfigError as exc:
        err_console.print(str(exc), highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None

    async def _samples(runtime: Runtime) -> int:
        bus = await _connect(settings, runtime.nats_url, subjects.DEFAULT_CLIENT, forever=False)
        try:
            failures = 0
            for sample in samples:
                console.print(f"\n[bold]{sample.name}[/bold]: {sample.text}")
                if not await _run_sample(settings, bus, sample, timeout):
                    failures += 1
        finally:
            await bus.close()
        console.print(f"\n{len(samples) - failures}/{len(samples)} conversations ended as expected")
        if not once:
            console.print(
                f"The demo's team keeps running in its own state ({settings.state_dir}); "
                "`corral up` runs yours, apart from it.",
                highlight=False,
            )
            return -1
        return 0 if failures == 0 else 1

    _run(_with_stack(settings, _samples))


def _demo_settings(settings: Settings) -> Settings:
    """The team's settings with the demo's own state, emptied first (unless a demo runs)."""
    state_dir = settings.state_dir / DEMO_STATE
    running = Runtime.read(state_dir)
    if running is not None:
        err_console.print(
            f"a demo is already running from this directory (pid {running.pid}); "
            "Ctrl-C it, or `CORRAL_STATE_DIR=" + str(state_dir) + " corral down`",
            highlight=False,
        )
        raise typer.Exit(1)
    shutil.rmtree(state_dir, ignore_errors=True)
    # Its API on a free port: a demo runs beside a `corral up` of the same team.
    return dataclasses.replace(settings, state_dir=state_dir, api_port=0)


async def _run_sample(settings: Settings, bus: Bus, sample: Sample, seconds: float) -> bool:
    """Send one sample, approve it if it is marked for approval, and check the outcome."""
    from corral.bus import ConversationEnded, ConversationWaiting, ToolDecided
    from corral.supervisor.cli._operator import _decide
    from corral.supervisor.core._client import send_until_settled, watching

    decisions: list[ToolDecided] = []

    def _on_update(update: ClientUpdate) -> None:
        if isinstance(update, ToolDecided):
            decisions.append(update)
        _print_update(update)

    try:
        settled = await send_until_settled(
            bus, sample.text, customer=sample.customer, timeout_s=seconds, on_update=_on_update
        )
        if isinstance(settled, ConversationWaiting):
            if not sample.approve:
                console.print(
                    f"  [red]unexpected: waiting for approval {settled.approval_id} "
                    "(the sample is not marked `approve: true`)[/red]",
                    highlight=False,
                )
                return False
            # The demo plays the human: it approves, and the conversation resumes.
            console.print(
                f"  waiting for approval {settled.approval_id}; approving it as the demo operator",
                highlight=False,
            )
            async with watching(bus, settled.conversation, on_update=_on_update) as done:
                await _decide(settings, settled.approval_id, True, "demo", "")
                resumed = await asyncio.wait_for(done, seconds)
            assert isinstance(resumed, ConversationEnded)
            settled = resumed
    except TimeoutError:
        console.print(f"  [red]timed out after {seconds:.0f}s[/red]")
        return False
    assert isinstance(settled, ConversationEnded)
    _print_ended(settled)
    problem = _check_expectation(settled, sample.expect, decisions)
    if problem:
        console.print(f"  [red]unexpected: {problem}[/red]", highlight=False)
        return False
    console.print("  [green]as expected[/green]")
    return True


def _check_expectation(
    ended: ConversationEnded, expect: dict[str, Any], decisions: list[ToolDecided] | None = None
) -> str | None:
    """What differs from the sample's expected outcome, or None.

    ``status`` and ``path`` must be equal; ``tools`` (``"AGENT TOOL -> STATUS"`` in the
    order the gateway decided them) must be equal when given, and a sample that gives no
    ``tools`` must make no tool call; ``reply_contains`` and ``reason_contains`` are
    substrings.
    """
    path = [hop.agent for hop in ended.path]
    if "status" in expect and ended.status != expect["status"]:
        return f"status {ended.status}, expected {expect['status']}"
    if "path" in expect and path != expect["path"]:
        return f"path {path}, expected {expect['path']}"
    if decisions is not None:
        made = [f"{d.agent} {d.tool} -> {d.status}" for d in decisions]
        wanted = list(expect.get("tools", []))
        if made != wanted:
            return f"tool decisions {made}, expected {wanted}"
    if "reply_contains" in expect and expect["reply_contains"] not in (ended.reply or ""):
        return f"reply does not contain {expect['reply_contains']!r}"
    if "reason_contains" in expect and expect["reason_contains"] not in (ended.reason or ""):
        return f"reason does not contain {expect['reason_contains']!r}"
    return None
