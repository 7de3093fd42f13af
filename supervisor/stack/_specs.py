"""What ``corral up`` runs: each child process's name, role and command line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from corral.supervisor.config._config import LoadedConfig
from corral.supervisor.stack._credentials import API, ROUTER
from corral.supervisor.stack._embedded import free_port
from corral.supervisor.stack._runtime import ChildInfo


@dataclass(frozen=True)
class Specs:
    """The children, with the command line (after ``corral``) each runs; and the API's URL."""

    children: list[tuple[ChildInfo, list[str]]]
    api_url: str | None


def child_specs(loaded: LoadedConfig, replicas: Mapping[str, int], api_port: int) -> Specs:
    """The supervisor, a separate tool gateway if configured, the model gateways, the API
    (on ``api_port``, or a free one for 0) and each agent's replicas (``replicas``
    overrides the config's)."""
    config_file = str(loaded.path.resolve())
    config = loaded.config
    specs: list[tuple[ChildInfo, list[str]]] = [
        (ChildInfo(name="supervisor", role="supervisor"), ["supervisor", "run", "-c", config_file])
    ]
    if config.tools is not None and config.tools.separate_gateway:
        specs.append((ChildInfo(name="gateway", role="gateway"), ["gateway", "run", "-c", config_file]))
    routers = config.router.replicas
    for index in range(routers):
        name = ROUTER if routers == 1 else f"{ROUTER}-{index + 1}"
        specs.append((ChildInfo(name=name, role=ROUTER), ["router", "run", "-c", config_file]))
    api_url = None
    if config.api.enabled:
        port = api_port or free_port(config.api.host)
        api_url = f"http://{config.api.host}:{port}"
        specs.append((ChildInfo(name=API, role=API), ["api", "run", "--port", str(port), "-c", config_file]))
    for agent in loaded.agent_names:
        count = replicas.get(agent, config.agents[agent].replicas)
        for index in range(count):
            name = agent if count == 1 else f"{agent}-{index + 1}"
            specs.append((ChildInfo(name=name, role=agent), ["agent", "run", agent, "-c", config_file]))
    return Specs(children=specs, api_url=api_url)
