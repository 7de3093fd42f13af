"""CS-4-MT: CS-4 as a dialogue, three customer turns per conversation.

    python bench/cs4_mt.py                      # CS-4 sizes, one run
    python bench/cs4_mt.py --runs 3 --json mt.json

The CS-4 team and refund at the ``direct`` depth, but the customer says what it needs over
three turns:

1. "Hello, I need help with a charge": triage hands off to payments, which asks which
   order (a reply with ``awaiting_customer``);
2. "It is order <id>": payments refunds it and hands off to account_manager, which asks
   whether there is anything else;
3. "No, that is all for order <id>": account_manager replies, and the conversation is
   resolved.

Six model calls, one tool call, two handoffs and three supervisor decisions on customer
messages, against CS-4's four model calls. A conversation's latency runs from its first
message to the verified final reply, and counts the client's own turn-taking (it answers
as soon as it is asked). The phases, sizes and figures are CS-4's (bench/_phases.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._phases import Sizes, add_size_arguments, run_phases, sizes_of
from bench.cs4 import ORDER, TEAM, Corral, _customer, _order, machine, phase_json, refund_rules
from corral.bus import ClientUpdate, ConversationAwaiting, ConversationEnded
from corral.supervisor import start_conversation
from corral.supervisor.core._client import send_message

_updates = msgspec.json.Decoder(ClientUpdate)
TURNS = 3


def mt_rules() -> dict[str, Any]:
    """The scripted model of CS-4-MT: each agent asks, or acts on the customer's answer."""
    return {
        "agents": {
            "triage": [{"answer": {"action": "handoff", "target": "payments", "confidence": 0.93}}],
            "payments": [
                *refund_rules("cs4-mt"),
                {
                    "answer": {
                        "action": "reply",
                        "text": "Which order is it?",
                        "confidence": 0.9,
                        "awaiting_customer": True,
                    }
                },
            ],
            "account_manager": [
                {
                    **ORDER,
                    "when": ["that is all"],
                    "answer": {
                        "action": "reply",
                        "text": "Refund of order {order} issued.",
                        "confidence": 0.95,
                    },
                },
                {
                    "answer": {
                        "action": "reply",
                        "text": "Your refund is on its way. Anything else?",
                        "confidence": 0.9,
                        "awaiting_customer": True,
                    }
                },
            ],
        }
    }


class DialogueCorral(Corral):
    """``bench.cs4.Corral`` whose conversations take three customer turns."""

    def __init__(self, workdir: Path, **kwargs: Any) -> None:
        super().__init__(workdir, "direct", **kwargs)
        config_dir = workdir / "cs4"
        shutil.copytree(REPO / "examples" / "support", config_dir)
        (config_dir / "scripted.yaml").write_text(yaml.safe_dump(mt_rules()))
        self._settled: dict[str, asyncio.Queue[ClientUpdate]] = {}
        self.turn_ms: list[tuple[int, float]] = []
        """(conversation number, milliseconds) of each turn, first message to its answer."""

    async def _update(self, msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            update = _updates.decode(msg.data)
            if isinstance(update, ConversationAwaiting | ConversationEnded):
                queue = self._settled.get(update.conversation)
                if queue is not None:
                    queue.put_nowait(update)

    async def converse(self, n: int) -> None:
        """Conversation ``n``, three turns; raises unless each settled as expected."""
        bus = self._bus
        assert bus is not None
        conversation = f"mt-{n:06d}"
        settled: asyncio.Queue[ClientUpdate] = asyncio.Queue()
        self._settled[conversation] = settled
        loop = asyncio.get_running_loop()
        try:
            began = loop.time()
            await start_conversation(
                bus, "Hello, I need help with a charge", customer=_customer(n), conversation=conversation
            )
            await self._expect(settled, conversation, ConversationAwaiting, "payments")
            self.turn_ms.append((n, (loop.time() - began) * 1000))
            for text, agent in (
                (f"It is order {_order(n)}", "account_manager"),
                (f"No, that is all for order {_order(n)}", None),
            ):
                began = loop.time()
                await send_message(bus, conversation, text, message_id=f"m-{conversation}-{agent or 'end'}")
                if agent is not None:
                    await self._expect(settled, conversation, ConversationAwaiting, agent)
                else:
                    ended = await self._expect(settled, conversation, ConversationEnded, None)
                    expected = f"Refund of order {_order(n)} issued."
                    path = [hop.agent for hop in ended.path]  # type: ignore[attr-defined]
                    if ended.status != "replied" or ended.reply != expected or path != list(TEAM):  # type: ignore[attr-defined]
                        raise RuntimeError(f"{conversation} ended {ended!r}")
                self.turn_ms.append((n, (loop.time() - began) * 1000))
        finally:
            del self._settled[conversation]

    async def _expect(
        self, settled: asyncio.Queue[ClientUpdate], conversation: str, kind: type, agent: str | None
    ) -> ClientUpdate:
        update = await asyncio.wait_for(settled.get(), self.timeout_s)
        if not isinstance(update, kind) or (agent is not None and update.agent != agent):  # type: ignore[attr-defined]
            raise RuntimeError(f"{conversation}: expected {kind.__name__} from {agent}, got {update!r}")
        return update


async def run_mt(workdir: Path, sizes: Sizes) -> dict[str, Any]:
    """One CS-4-MT run on a fresh stack; its figures."""
    corral = DialogueCorral(workdir)
    try:
        await corral.start(sizes.total)
        figures = await run_phases(corral.converse, corral.processes(), sizes)
        refunds, orders = await corral.refunds()
    finally:
        await corral.stop()
    # The sequential phase's turns (conversations are numbered warm-up first, then it).
    sequential = range(sizes.warmup, sizes.warmup + sizes.sequential)
    turns = [ms for n, ms in corral.turn_ms if n in sequential]
    return {
        "sequential": phase_json(figures.sequential),
        "concurrent": phase_json(figures.concurrent),
        "sequential_turn_p50_ms": round(statistics.median(turns), 2) if turns else 0.0,
        "refunds": refunds,
        "refunded_orders": orders,
        "orders": sizes.total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser, runs=1)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    sizes = sizes_of(args)
    runs = []
    for run in range(1, args.runs + 1):
        workdir = Path(tempfile.mkdtemp(prefix="corral-cs4-mt-"))
        try:
            print(f"run {run}/{args.runs}: CS-4-MT (three customer turns, direct)", flush=True)
            runs.append(asyncio.run(run_mt(workdir, sizes)))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    for report in runs:
        seq, conc = report["sequential"], report["concurrent"]
        print(
            f"seq p50 {seq['p50_ms']:.1f} ms, p99 {seq['p99_ms']:.1f} "
            f"(one turn: p50 {report['sequential_turn_p50_ms']:.1f}); "
            f"{conc['per_second']:.0f} conv/s, conc p50 {conc['p50_ms']:.0f} ms; "
            f"CPU {conc['cpu_ms_per_conversation']:.2f} ms/conv; PSS {conc['pss_mb']:.0f} MB; "
            f"{report['refunds']} refunds of {report['orders']} orders"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"workload": "CS-4-MT", "machine": machine(), "runs": runs}, indent=2) + "\n"
        )
    if any(r["refunds"] != r["orders"] or r["refunded_orders"] != r["orders"] for r in runs):
        sys.exit("refunds do not match conversations")


if __name__ == "__main__":
    main()
