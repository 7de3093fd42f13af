"""The CS-4 method, for any system: warm up, then a sequential and a concurrent phase.

A system under test is a coroutine function ``converse(n)`` that runs conversation ``n``
end to end (submit, wait for the verified final reply) and raises if it did not end as
expected; and a ``ProcessGroup`` of every process serving it. The load generator (this
process) is not counted: it is the same code for corral and for the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench._measure import PhaseFigures, ProcessGroup, cpu_spent, summarize

Converse = Callable[[int], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """How many conversations each phase runs (CS-4's defaults)."""

    warmup: int = 50
    warmup_in_flight: int = 10
    sequential: int = 300
    concurrent: int = 2000
    concurrent_in_flight: int = 200

    @property
    def total(self) -> int:
        return self.warmup + self.sequential + self.concurrent


def add_size_arguments(parser: argparse.ArgumentParser, *, runs: int) -> None:
    """The options every CS-4 workload takes: runs, and each phase's size."""
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--concurrent", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=200, help="concurrent phase: conversations at once")


def sizes_of(args: argparse.Namespace) -> Sizes:
    """The phases' sizes the options ask for (``add_size_arguments``)."""
    return Sizes(
        warmup=args.warmup,
        sequential=args.sequential,
        concurrent=args.concurrent,
        concurrent_in_flight=args.in_flight,
    )


@dataclass(frozen=True, kw_only=True)
class RunFigures:
    """One run of one system."""

    sequential: PhaseFigures
    concurrent: PhaseFigures


async def bounded(converse: Converse, numbers: range, in_flight: int) -> list[float]:
    """Run ``numbers`` with at most ``in_flight`` at once; each one's latency in seconds."""
    latencies: list[float] = []
    queue = iter(numbers)

    async def worker() -> None:
        for n in queue:
            started = time.perf_counter()
            await converse(n)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(min(in_flight, len(numbers)))))
    return latencies


async def measure(
    converse: Converse,
    group: ProcessGroup,
    numbers: range,
    in_flight: int,
    sample_s: float | None = 0.5,
) -> PhaseFigures:
    """One measured phase: ``numbers`` at most ``in_flight`` at once, the group's CPU over
    the phase, and its memory at the highest of the samples taken every ``sample_s`` (None:
    one sample at the end, so that sampling does not disturb a latency phase)."""
    samples: list[dict[str, float]] = []

    async def sample_memory() -> None:
        while sample_s is not None:
            await asyncio.sleep(sample_s)
            samples.append(await asyncio.to_thread(group.pss_by_process))

    sampler = asyncio.create_task(sample_memory())
    before, started = group.cpu(), time.perf_counter()
    try:
        latencies = await bounded(converse, numbers, in_flight)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    seconds = time.perf_counter() - started
    spent = cpu_spent(before, group.cpu())
    if not samples:
        samples.append(group.pss_by_process())
    pss = max(samples, key=lambda s: sum(v for k, v in s.items() if k not in group.outside))
    return summarize(latencies, seconds, spent, pss, group.outside)


async def run_phases(
    converse: Converse,
    group: ProcessGroup,
    sizes: Sizes,
    first: int = 0,
    beside_concurrent: Callable[[], Awaitable[None]] | None = None,
) -> RunFigures:
    """Warm-up, sequential, concurrent; conversations are numbered from ``first``.
    ``beside_concurrent`` runs while the concurrent phase does (a reader of the console,
    say), and is cancelled when it ends."""
    n = first
    await bounded(converse, range(n, n + sizes.warmup), sizes.warmup_in_flight)
    n += sizes.warmup
    sequential = await measure(converse, group, range(n, n + sizes.sequential), 1, sample_s=None)
    n += sizes.sequential
    beside = asyncio.create_task(beside_concurrent()) if beside_concurrent is not None else None
    try:
        concurrent = await measure(
            converse, group, range(n, n + sizes.concurrent), sizes.concurrent_in_flight
        )
    finally:
        if beside is not None:
            beside.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beside
    return RunFigures(sequential=sequential, concurrent=concurrent)
