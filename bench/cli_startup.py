"""How long a `corral` command takes to start and do its work, as a user runs it.

    python bench/cli_startup.py                 # 11 runs of each command
    python bench/cli_startup.py --runs 21 --json cli.json

Each command runs as the installed ``corral`` console script, in a fresh process, N times;
the wall time of the whole process is measured (start, imports, config, the command's
work, exit) and the median and the fastest run are printed. The program starts its own
nats-server and PostgreSQL so that each command does what it does for a user:

| command | what it does here |
| --- | --- |
| ``help`` | ``corral --help``: register every command, print the help |
| ``version`` | ``corral --version`` |
| ``status`` | ``corral status`` with no stack and no servers configured (exit 3) |
| ``send`` | ``corral send TEXT``: connect to NATS, publish the start (the streams exist) |
| ``approve`` | ``corral approve ID``: find it, check the kill switches, grant it, tell the supervisor |
| ``show`` | ``corral show CONV``: read one conversation |

The target (corral issue 15): ``help``, ``send``, ``approve`` and ``status`` under 0.3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
sys.path.insert(0, str(REPO))

TARGET_S = 0.3
TARGETED = ("help", "send", "approve", "status")


def _corral() -> str:
    found = shutil.which("corral") or str(Path(sys.executable).parent / "corral")
    if not Path(found).exists():
        raise SystemExit("the `corral` console script is not installed: pip install -e .")
    return found


async def _prepare(nats_url: str, database_url: str, approvals: int) -> None:
    """Streams and consumers on NATS; corral's tables, one conversation to show, and one
    pending approval (of a waiting conversation) per `approve` run in PostgreSQL."""
    from corral.bus import BusConfig, connect, ensure_topology
    from corral.supervisor.config._config import SAMPLE_CONFIG, load_config
    from corral.supervisor.store._store import Store

    loaded = load_config(SAMPLE_CONFIG)
    bus = await connect(BusConfig(servers=[nats_url], reconnect_forever=False))
    try:
        await ensure_topology(bus.js, loaded.agent_names)
    finally:
        await bus.close()
    store = await Store.open(database_url, min_size=1, max_size=1)
    try:
        await store.pool.execute(
            "INSERT INTO conversations (id, text, status, current_agent, step)"
            " VALUES ('c-bench', 'Please refund order 1002', 'waiting', 'payments', 2)"
        )
        await store.pool.executemany(
            "INSERT INTO approvals (id, action_hash, conversation, customer, agent, tool, arguments,"
            " approver, expires_at) VALUES ($1, $1, 'c-bench', 'cus_1001', 'payments', 'refund',"
            " '{}'::jsonb, 'human', now() + interval '1 hour')",
            [(f"a-bench-{n}",) for n in range(approvals)],
        )
    finally:
        await store.close()


def _time(argv: list[str], env: dict[str, str], cwd: Path, expect: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    if done.returncode != expect:
        raise SystemExit(f"{' '.join(argv[1:])} exited {done.returncode}, not {expect}:\n{done.stderr}")
    return elapsed


def measure(runs: int) -> dict[str, dict[str, float]]:
    """Median and fastest wall time of each command, in seconds."""
    from corral.supervisor.stack._embedded import EmbeddedNats, EmbeddedPostgres

    corral = _corral()
    with tempfile.TemporaryDirectory(prefix="corral-cli-") as tmp:
        root = Path(tmp)
        nats = EmbeddedNats(root / "nats")
        postgres = EmbeddedPostgres(root / "postgres")
        nats.start()
        try:
            database_url = postgres.start()
            try:
                asyncio.run(_prepare(nats.url, database_url, runs))
                base = {
                    k: v
                    for k, v in os.environ.items()
                    if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_CREDS", "CORRAL_STATE_DIR"}
                }
                base["CORRAL_STATE_DIR"] = str(root / "state")
                servers = {**base, "NATS_URL": nats.url, "DATABASE_URL": database_url}
                approvals = iter(range(runs))
                commands: dict[str, tuple[Callable[[], list[str]], dict[str, str], int]] = {
                    "help": (lambda: [corral, "--help"], base, 0),
                    "version": (lambda: [corral, "--version"], base, 0),
                    "status": (lambda: [corral, "status"], base, 3),
                    "send": (lambda: [corral, "send", "I was charged twice for order 1001"], servers, 0),
                    "approve": (lambda: [corral, "approve", f"a-bench-{next(approvals)}"], servers, 0),
                    "show": (lambda: [corral, "show", "c-bench"], servers, 0),
                }
                figures = {}
                for name, (argv, env, expect) in commands.items():
                    times = [_time(argv(), env, root, expect) for _ in range(runs)]
                    figures[name] = {"median_s": statistics.median(times), "min_s": min(times)}
            finally:
                postgres.stop()
        finally:
            nats.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=11, help="runs of each command (default 11)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    figures = measure(args.runs)
    print(f"corral command start-up, {args.runs} runs each (wall time of the whole process)")
    print(f"{'command':<10} {'median':>8} {'fastest':>8}  target")
    for name, figure in figures.items():
        target = (
            f"< {TARGET_S:.1f} s " + ("ok" if figure["median_s"] < TARGET_S else "MISSED")
            if name in TARGETED
            else ""
        )
        print(f"{name:<10} {figure['median_s']:>7.3f}s {figure['min_s']:>7.3f}s  {target}")
    if args.json:
        args.json.write_text(
            json.dumps({"runs": args.runs, "target_s": TARGET_S, "commands": figures}, indent=2)
        )


if __name__ == "__main__":
    main()
