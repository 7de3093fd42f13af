"""What the benchmarks measure: latencies, the CPU time and the memory of a set of processes.

CPU is read from the kernel per process (user + system, via psutil) before and after a
phase; a process that starts during the phase counts from zero. Memory is the summed
proportional set size (PSS), so pages shared between processes count once in total.

A group may also watch processes *outside* the system under test (the scripted OpenAI
server that plays the provider): they are measured and reported on their own, never
added to the totals.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True, kw_only=True)
class PhaseFigures:
    """One measured phase."""

    conversations: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_conversation: float
    mean_ms: float = 0.0
    cpu_ms_by_process: dict[str, float] = field(default_factory=dict)
    """CPU milliseconds per conversation of each process group (by name)."""
    pss_mb: float = 0.0
    pss_mb_by_process: dict[str, float] = field(default_factory=dict)
    """PSS of each process group (by name), MB, at the same sample as ``pss_mb``."""
    outside_cpu_ms: dict[str, float] = field(default_factory=dict)
    """CPU milliseconds per conversation of the processes outside the system (by name)."""
    outside_pss_mb: dict[str, float] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.conversations / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, round(q) - 1))]


class ProcessGroup:
    """Processes whose resources add up: given roots and everything they spawn.

    Args:
        roots: Name -> pid of each root; a root's descendants are counted under its name.
        outside: Names of roots that are measured but are not the system under test (the
            provider a benchmark plays): their figures are kept apart from the totals.
    """

    def __init__(self, roots: dict[str, int], *, outside: Iterable[str] = ()) -> None:
        self._roots = roots
        self.outside = frozenset(outside)

    def processes(self) -> dict[int, tuple[str, psutil.Process]]:
        """Every live process of the group, by pid, with the name of its root."""
        found: dict[int, tuple[str, psutil.Process]] = {}
        for name, pid in self._roots.items():
            try:
                root = psutil.Process(pid)
                members = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for process in members:
                found.setdefault(process.pid, (name, process))
        return found

    def cpu(self) -> dict[int, tuple[str, float]]:
        """User + system CPU seconds of every live process, by pid."""
        times: dict[int, tuple[str, float]] = {}
        for pid, (name, process) in self.processes().items():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                cpu = process.cpu_times()
                times[pid] = (self._label(name, process), cpu.user + cpu.system)
        return times

    def pss_by_process(self) -> dict[str, float]:
        """Proportional set size of each process group (by label, outside ones too), MB."""
        sizes: dict[str, float] = {}
        for name, process in self.processes().values():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                label = self._label(name, process)
                sizes[label] = sizes.get(label, 0.0) + process.memory_full_info().pss / 1e6
        return sizes

    def pss_mb(self) -> float:
        """Summed proportional set size of the group (not of its outside roots), in MB."""
        return sum(mb for label, mb in self.pss_by_process().items() if label not in self.outside)

    def _label(self, root: str, process: psutil.Process) -> str:
        return root if root in self.outside else _label(root, process)


def _label(root: str, process: psutil.Process) -> str:
    """Group PostgreSQL backends and corral's children under readable names."""
    with contextlib.suppress(psutil.Error):
        if process.name() in {"nats-server", "postgres"}:
            return str(process.name())
        cmdline = process.cmdline()  # python -m corral.supervisor <command> run ...
        if "corral.supervisor.store._otlp_export" in cmdline:
            return "otlp export"  # the supervisor's OTLP export process
        if "corral.supervisor" in cmdline and "agent" in cmdline:
            return f"agent {cmdline[cmdline.index('agent') + 2]}" if "run" in cmdline else root
        if "corral.supervisor" in cmdline and "router" in cmdline and "run" in cmdline:
            return "router"  # the model gateway (litellm lives here)
        if "corral.supervisor" in cmdline and "api" in cmdline and "run" in cmdline:
            return "api"  # the HTTP/SSE API
        if "corral.supervisor" in cmdline and "run" in cmdline:
            return "supervisor"
    return root


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two ``ProcessGroup.cpu()`` readings, per label."""
    spent: dict[str, float] = {}
    for pid, (label, seconds) in after.items():
        start = before.get(pid, (label, 0.0))[1]
        spent[label] = spent.get(label, 0.0) + max(0.0, seconds - start)
    return spent


def summarize(
    latencies_s: Iterable[float],
    seconds: float,
    cpu_s: dict[str, float],
    pss_mb: dict[str, float] | None = None,
    outside: frozenset[str] = frozenset(),
) -> PhaseFigures:
    """Figures of one phase from its latencies, wall time, CPU spent (seconds by label) and
    memory (MB by label, ``ProcessGroup.pss_by_process()``); the labels in ``outside`` are
    reported apart and kept out of the totals."""
    ms = sorted(x * 1000 for x in latencies_s)
    n = len(ms)
    cpu_ms = {k: v * 1000 / n for k, v in sorted(cpu_s.items())} if n else {}
    pss = dict(sorted((pss_mb or {}).items()))
    return PhaseFigures(
        conversations=n,
        seconds=seconds,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        mean_ms=statistics.fmean(ms) if ms else 0.0,
        cpu_ms_per_conversation=sum(v for k, v in cpu_ms.items() if k not in outside),
        cpu_ms_by_process={k: v for k, v in cpu_ms.items() if k not in outside},
        pss_mb=sum(v for k, v in pss.items() if k not in outside),
        pss_mb_by_process={k: v for k, v in pss.items() if k not in outside},
        outside_cpu_ms={k: v for k, v in cpu_ms.items() if k in outside},
        outside_pss_mb={k: v for k, v in pss.items() if k in outside},
    )
