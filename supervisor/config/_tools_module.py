"""The module that holds a team's tools, named in ``corral.yaml`` by import path or by file.

``tools: {path: tools.py}`` (relative to the config file) makes a team's tools plain user
code beside its config, as the sample team's are; ``tools: {module: my_team.tools}`` names
an installed module. Either way every process that needs the tools (the supervisor, the
gateway, a tool's child process, the CLI) gets the same module: a file is loaded under one
name derived from its path, so the classes it defines pickle into a child and back.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

FROM_FILE = "corral_tools_"
"""The prefix of the names tool files are loaded under (``corral_tools_<stem>_<hash>``)."""


def import_tools(reference: str) -> ModuleType:
    """The tools module ``reference`` names: a ``.py`` file's absolute path, or an import path.

    Raises:
        ImportError: it cannot be found or loaded (the message says which).
        Exception: what running the file raised.
    """
    if not reference.endswith(".py"):
        return importlib.import_module(reference)
    path = Path(reference)
    name = module_name(path)
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"no tools file {path}", name=name, path=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: pydantic and dataclasses look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def module_name(path: Path) -> str:
    """The name the tools file at ``path`` (absolute) is loaded under."""
    stem = re.sub(r"\W", "_", path.stem)
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return f"{FROM_FILE}{stem}_{digest}"


def file_of(module: str) -> str | None:
    """The file a module loaded by ``import_tools`` came from (None for any other module)."""
    if not module.startswith(FROM_FILE):
        return None
    loaded = sys.modules.get(module)
    return getattr(loaded, "__file__", None)
