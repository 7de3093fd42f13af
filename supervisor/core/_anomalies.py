"""The anomaly detectors, as plain counters fed what happened (and when): an agent's tool
calls (their rate against its rolling baseline, and the same call repeated), a model's
failed attempts (a retry storm), and an ended conversation's cost against the median of
its path. Each returns the alerts it raises; ``AnomalyWatch`` and the model gateway feed
them and publish what they raise (``corral.alerts``).

An alert of one kind about one thing (an agent, a call, a model, a path) is raised once
per ``quiet_s``: a storm is one alert, not thousands.
"""

from __future__ import annotations

import statistics
from collections import Counter, OrderedDict, deque

from corral.bus import Alert
from corral.supervisor.config._sections import AlertsSection

_REMEMBERED_CALLS = 100_000
"""Distinct (conversation, tool, arguments) the repeat counter remembers; the oldest go."""
_COST_SAMPLES = 200
"""Ended conversations per path the cost median is taken over (the newest)."""


class _Quiet:
    """Whether an alert about ``key`` may be raised now (once per ``quiet_s``)."""

    def __init__(self, quiet_s: float) -> None:
        self._quiet_s = quiet_s
        self._last: dict[tuple[str, ...], float] = {}

    def allows(self, key: tuple[str, ...], at: float) -> bool:
        last = self._last.get(key)
        if last is not None and at - last < self._quiet_s:
            return False
        self._last[key] = at
        return True


class ToolCallWatch:
    """An agent's tool calls: too many in a window for its baseline, or one call repeated."""

    def __init__(self, section: AlertsSection) -> None:
        self._s = section
        self._quiet = _Quiet(section.quiet_s)
        self._window_start: float | None = None
        self._counts: Counter[str] = Counter()
        self._history: dict[str, deque[int]] = {}
        self._calls: OrderedDict[tuple[str, str, str], int] = OrderedDict()

    def baseline(self, agent: str) -> float:
        """The agent's mean tool calls per window, over the last ``baseline_windows``."""
        history = self._history.get(agent)
        return statistics.fmean(history) if history else 0.0

    def observe(self, agent: str, conversation: str, tool: str, digest: str, at: float) -> list[Alert]:
        """One tool call ``agent`` asked the gateway for at ``at``."""
        self._roll(at)
        raised: list[Alert] = []
        self._counts[agent] += 1
        count = self._counts[agent]
        baseline = self.baseline(agent)
        threshold = max(self._s.tool_rate_min_calls, self._s.tool_rate_factor * baseline)
        if count >= threshold and self._quiet.allows(("tool_rate", agent), at):
            raised.append(
                Alert(
                    kind="tool_rate",
                    agent=agent,
                    conversation=conversation,
                    at=at,
                    reason=f"{agent} made {count} tool calls within {self._s.window_s:g} s"
                    f" (its baseline: {baseline:.1f} per window)",
                )
            )
        key = (conversation, tool, digest)
        times = self._calls.pop(key, 0) + 1
        self._calls[key] = times
        if len(self._calls) > _REMEMBERED_CALLS:
            self._calls.popitem(last=False)
        if times >= self._s.repeated_calls and self._quiet.allows(("repeated_call", *key), at):
            raised.append(
                Alert(
                    kind="repeated_call",
                    agent=agent,
                    conversation=conversation,
                    at=at,
                    reason=f"{agent} called {tool} with the same arguments {times} times in {conversation}",
                )
            )
        return raised

    def _roll(self, at: float) -> None:
        """Close the windows that ended before ``at`` into each agent's history."""
        if self._window_start is None:
            self._window_start = at
            return
        window = self._s.window_s
        ended = int((at - self._window_start) // window)
        if ended <= 0:
            return
        agents = set(self._history) | set(self._counts)
        for agent in agents:
            history = self._history.setdefault(agent, deque(maxlen=self._s.baseline_windows))
            history.append(self._counts.get(agent, 0))
            history.extend([0] * min(ended - 1, self._s.baseline_windows))
        self._counts.clear()
        self._window_start += ended * window


class RetryStormWatch:
    """Failed attempts toward each model within a window."""

    def __init__(self, section: AlertsSection) -> None:
        self._s = section
        self._quiet = _Quiet(section.quiet_s)
        self._failures: dict[str, deque[tuple[float, str]]] = {}

    def observe(self, model: str, agent: str, outcome: str, at: float) -> list[Alert]:
        """One attempt toward ``model`` for ``agent``: ``ok``, or what failed."""
        if outcome == "ok":
            return []
        failures = self._failures.setdefault(model, deque())
        failures.append((at, agent))
        while failures and failures[0][0] <= at - self._s.window_s:
            failures.popleft()
        if len(failures) < self._s.retry_storm_failures or not self._quiet.allows(("retry_storm", model), at):
            return []
        agents = Counter(a for _, a in failures)
        worst, _ = agents.most_common(1)[0]
        return [
            Alert(
                kind="retry_storm",
                model=model,
                agent=worst,
                at=at,
                reason=f"{len(failures)} failed attempts toward {model} within {self._s.window_s:g} s"
                f" (the last {outcome}; most of them for {worst})",
            )
        ]


class CostWatch:
    """An ended conversation's cost against the median of the conversations on its path."""

    def __init__(self, section: AlertsSection) -> None:
        self._s = section
        self._quiet = _Quiet(section.quiet_s)
        self._costs: dict[str, deque[float]] = {}

    def observe(self, conversation: str, path: str, cost_usd: float, at: float) -> list[Alert]:
        """``conversation`` ended after ``path`` (its agents, ``a -> b``), costing ``cost_usd``."""
        costs = self._costs.setdefault(path, deque(maxlen=_COST_SAMPLES))
        raised: list[Alert] = []
        if len(costs) >= self._s.cost_min_samples:
            median = statistics.median(costs)
            if (
                median > 0
                and cost_usd > self._s.cost_factor * median
                and self._quiet.allows(("cost_outlier", conversation), at)
            ):
                raised.append(
                    Alert(
                        kind="cost_outlier",
                        conversation=conversation,
                        at=at,
                        reason=f"{conversation} cost ${cost_usd:.4f}, {cost_usd / median:.1f}x the median"
                        f" ${median:.4f} of {len(costs)} conversations on {path}",
                    )
                )
        costs.append(cost_usd)
        return raised
