"""Settings: corral.yaml plus the environment, read once into what the services run with;
and the launcher as an async context manager that stops every child it started."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from corral.bus import TopologyConfig
from corral.supervisor import ConfigError, EmbeddedNats, load_config
from corral.supervisor.stack._launcher import Launcher, LauncherConfig
from corral.supervisor.stack._runtime import pid_alive
from corral.supervisor.stack._settings import Settings
from corral.supervisor.store._budgets import Budgets
from tests.conftest import SAMPLE_CONFIG, eventually

OVERRIDING = {
    "CORRAL_STATE_DIR": "/tmp/corral-settings-state",
    "NATS_URL": "nats://10.0.0.1:4222,nats://10.0.0.2:4222",
    "DATABASE_URL": "postgresql://owner@db/corral",
    "CORRAL_SUPERVISOR_DATABASE_URL": "postgresql://corral_supervisor@db/corral",
    "CORRAL_NATS_MONITOR_PORT": "8222",
    "CORRAL_STREAM_REPLICAS": "3",
    "CORRAL_CREDS": "/run/secrets/agent.nk",
    "CORRAL_DATABASE_PREPARED": "1",
    "CORRAL_AUDIT_PUBLIC_KEYS": "UKEY1,UKEY2",
}


def _team(tmp_path: Path, old: str = "", new: str = "") -> Path:
    """A copy of the sample team, with ``old`` replaced by ``new`` in its corral.yaml."""
    folder = tmp_path / "team"
    shutil.copytree(SAMPLE_CONFIG.parent, folder)
    path = folder / "corral.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def test_environment_overrides_the_yaml() -> None:
    settings = Settings.load(str(SAMPLE_CONFIG), environ=OVERRIDING)
    assert settings.path == SAMPLE_CONFIG
    assert settings.state_dir == Path("/tmp/corral-settings-state")
    assert settings.nats_url == OVERRIDING["NATS_URL"]
    assert settings.database_url == OVERRIDING["DATABASE_URL"]
    assert settings.supervisor_database_url == OVERRIDING["CORRAL_SUPERVISOR_DATABASE_URL"]
    assert settings.monitor_port == 8222
    assert settings.topology.replicas == 3
    assert settings.credentials_for("agent-triage") == Path("/run/secrets/agent.nk")
    assert settings.database_prepared
    assert settings.audit_public_keys == "UKEY1,UKEY2"


def test_the_yaml_when_the_environment_is_silent(tmp_path: Path) -> None:
    path = _team(
        tmp_path,
        "version: 1\n",
        "version: 1\nstate_dir: here\nnats: {url: 'nats://yaml:4222', stream_replicas: 2, monitor_port: 0}\n"
        "database: {url: 'postgresql://yaml/db', supervisor_url: 'postgresql://sup@yaml/db'}\n",
    )
    # Empty counts as unset (the monitor port's empty means off: see the next test).
    empty = {name: "" for name in OVERRIDING if name != "CORRAL_NATS_MONITOR_PORT"}
    for environ in ({}, empty):
        settings = Settings.load(str(path), environ=environ)
        assert settings.state_dir == Path("here").resolve()
        assert settings.nats_url == "nats://yaml:4222"
        assert settings.database_url == "postgresql://yaml/db"
        assert settings.supervisor_database_url == "postgresql://sup@yaml/db"
        assert settings.monitor_port == 0
        assert settings.topology.replicas == 2
        assert settings.creds_dir == Path("here").resolve() / "creds"
        assert settings.credentials_for("agent-triage") is None  # no seed: an open server
        assert not settings.database_prepared
        assert settings.audit_public_keys == ""


def test_an_empty_monitor_port_turns_the_endpoint_off(tmp_path: Path) -> None:
    path = _team(tmp_path, "version: 1\n", "version: 1\nnats: {monitor_port: 8222}\n")
    assert Settings.load(str(path), environ={}).monitor_port == 8222
    assert Settings.load(str(path), environ={"CORRAL_NATS_MONITOR_PORT": ""}).monitor_port is None


def test_the_environment_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in OVERRIDING.items():
        monkeypatch.setenv(name, value)
    settings = Settings.load(str(SAMPLE_CONFIG))  # this process's environment
    for name in OVERRIDING:
        monkeypatch.setenv(name, "9" if name.endswith(("PORT", "REPLICAS")) else "changed")
    assert settings.nats_url == OVERRIDING["NATS_URL"]
    assert settings.database_url == OVERRIDING["DATABASE_URL"]
    assert settings.topology.replicas == 3
    assert settings.monitor_port == 8222
    assert settings.state_dir == Path(OVERRIDING["CORRAL_STATE_DIR"])
    assert settings.credentials_for("supervisor") == Path(OVERRIDING["CORRAL_CREDS"])
    monkeypatch.delenv("NATS_URL")
    assert settings.nats_url == OVERRIDING["NATS_URL"]


def test_an_api_key_is_read_with_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _team(
        tmp_path,
        "  smart:\n    model: scripted/support\n",
        "  smart:\n    model: scripted/support\n    api_key_env: CORRAL_TEST_SMART_KEY\n",
    )
    monkeypatch.setenv("CORRAL_TEST_SMART_KEY", "sk-first")
    settings = Settings.load(str(path))
    monkeypatch.setenv("CORRAL_TEST_SMART_KEY", "sk-second")
    assert settings.tier("payments").api_key == "sk-first"  # payments calls `smart`
    assert settings.tier("triage").api_key is None
    assert "sk-first" not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CORRAL_STREAM_REPLICAS", "abc"),
        ("CORRAL_STREAM_REPLICAS", "0"),
        ("CORRAL_STREAM_REPLICAS", "6"),
        ("CORRAL_NATS_MONITOR_PORT", "x"),
        ("CORRAL_NATS_MONITOR_PORT", "70000"),
        ("CORRAL_NATS_MONITOR_PORT", "-1"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(str(SAMPLE_CONFIG), environ={variable: value})
    assert variable in str(info.value) and repr(value) in str(info.value)
    assert info.value.field == variable


def test_what_settings_hand_out_is_what_the_config_says() -> None:
    loaded = load_config(SAMPLE_CONFIG)
    config = loaded.config
    settings = Settings.from_loaded(loaded, environ={})

    graph = settings.graph
    assert graph.entry == config.graph.entry == "triage"
    assert graph.edges == {source: settings.loaded.targets(source) for source in config.graph.edges}
    assert graph.edges["triage"] == ["payments", "tech_support", "account_manager"]
    assert set(graph.payloads) == {("triage", "payments")}
    assert graph.min_confidence == config.graph.min_confidence
    assert graph.max_steps == config.conversation.max_steps
    assert graph.max_pingpong == config.conversation.max_pingpong
    assert settings.graph is graph  # built once

    assert settings.budgets == Budgets(
        max_tokens=config.conversation.max_tokens,
        max_usd=config.conversation.max_usd,
        max_seconds=config.conversation.max_seconds,
        daily_usd={name: agent.daily_usd for name, agent in config.agents.items()},
        max_same_tool_calls=config.conversation.max_same_tool_calls,
    )
    assert settings.limits == config.limits.to_limits()
    assert settings.topology == TopologyConfig(
        replicas=config.nats.stream_replicas,
        ack_wait_s=config.nats.ack_wait_s,
        max_deliver=config.nats.max_deliver,
        dead_letter_max_bytes=config.limits.dead_letter_max_bytes,
        dead_letter_max_age_s=config.limits.dead_letter_max_age_s,
    )

    gateway = settings.gateway_config
    assert config.tools is not None
    assert gateway.budgets == settings.budgets
    assert gateway.approval_ttl == timedelta(seconds=config.tools.approval_ttl_s)
    assert gateway.max_pending_approvals == config.tools.max_pending_approvals
    assert gateway.call_timeout_s == config.tools.call_timeout_s
    assert gateway.limits == settings.limits
    assert gateway.grants == {name: frozenset(agent.tools) for name, agent in config.agents.items()}
    assert gateway.max_calls_per_step == {name: agent.max_tool_calls for name, agent in config.agents.items()}
    assert gateway.grants["triage"] == {"verify_customer", "lookup_customer", "lookup_order"}
    assert gateway.authenticating == {"verify_customer": "customer_id"}

    agent = settings.agent_settings("payments")
    assert agent.name == "payments"
    assert agent.instructions == loaded.instructions["payments"]
    assert agent.handoff_targets == loaded.targets("payments")
    assert [tool["name"] for tool in agent.tools] == config.agents["payments"].tools
    assert agent.tools[0]["schema"] == settings.tools["lookup_customer"].schema()
    assert agent.heartbeat_s == config.nats.ack_wait_s / 3
    assert agent.max_tool_calls == config.agents["payments"].max_tool_calls
    assert agent.max_deliver == config.nats.max_deliver
    assert agent.limits == settings.limits
    assert settings.tier("payments") == loaded.tier("payments")
    assert agent.tiers == ["smart"]  # no graph.tiers: no stronger tier to ask again
    assert agent.reply_min_confidence == config.graph.min_confidence
    triage = settings.agent_settings("triage")
    assert triage.team == loaded.agent_names
    to_payments = triage.edges[0]
    assert to_payments.target == "payments" and to_payments.min_confidence == config.graph.min_confidence
    assert to_payments.payload_schema is not None and "order_id" in to_payments.payload_schema["properties"]
    assert [edge.payload_schema for edge in triage.edges[1:]] == [None, None]


def test_a_team_without_tools_has_no_gateway_config(tmp_path: Path) -> None:
    path = _team(tmp_path)
    text = path.read_text()
    for name in ("tools", "agents"):
        assert f"\n{name}:" in text
    # No tools section, and no agent names a tool.
    head, _, rest = text.partition("\ntools:\n")
    _, _, agents = rest.partition("\nagents:\n")
    lines = [line for line in agents.splitlines() if not line.strip().startswith("tools:")]
    # A payload model is found in the tools module: without one, the edge is a plain one.
    edited = head + "\nagents:\n" + "\n".join(lines) + "\n"
    path.write_text(edited.replace("{to: payments, payload: RefundHandoff}", "payments"))
    settings = Settings.load(str(path), environ={})
    assert settings.tools == {}
    with pytest.raises(ConfigError, match="configures no tools"):
        _ = settings.gateway_config


async def test_leaving_the_launcher_waits_for_every_child(
    nats_server: EmbeddedNats, database_url: str, tmp_path: Path
) -> None:
    environ = {
        **os.environ,
        "NATS_URL": nats_server.url,
        "DATABASE_URL": database_url,
        "CORRAL_STATE_DIR": str(tmp_path / "state"),
        "CORRAL_API_PORT": "0",
    }
    settings = Settings.load(str(SAMPLE_CONFIG), environ=environ)
    launcher = Launcher(LauncherConfig(settings=settings, replicas={}))
    async with launcher as launched:
        assert launched is launcher and launched.runtime is not None
        children = launched.runtime.children
        assert {child.name for child in children} == {
            "supervisor",
            "router",
            "api",
            "triage",
            "payments",
            "tech_support",
            "account_manager",
        }
        await eventually(lambda: all(child.pid for child in children), message="every child started")
        pids = [child.pid for child in children if child.pid is not None]
        assert (settings.state_dir / "runtime.json").exists()
    # Leaving the block returned only once each child had exited (and was reaped).
    assert not any(pid_alive(pid) for pid in pids)
    assert not (settings.state_dir / "runtime.json").exists()
    await launcher.wait()  # stopped already: returns at once


async def test_a_refused_start_leaves_the_running_stack_alone(tmp_path: Path) -> None:
    from corral.supervisor import LauncherError
    from corral.supervisor.stack._runtime import Runtime

    state = tmp_path / "state"
    # A stack "runs" from this state directory: its launcher is this test's parent process.
    Runtime(
        pid=os.getppid(), nats_url="nats://elsewhere:4222", embedded_nats=False, embedded_postgres=False
    ).write(state)
    settings = Settings.load(str(SAMPLE_CONFIG), environ={"CORRAL_STATE_DIR": str(state)})
    with pytest.raises(LauncherError, match="already running"):
        async with Launcher(LauncherConfig(settings=settings, replicas={})):
            raise AssertionError("started beside a running stack")
    assert Runtime.read(state) is not None
