"""corral.yaml: the sample loads; bad files fail at load naming the file, line and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from corral.supervisor import ConfigError, load_config
from tests.conftest import SAMPLE_CONFIG


def _write(tmp_path: Path, text: str) -> Path:
    sample = SAMPLE_CONFIG.read_text()
    path = tmp_path / "corral.yaml"
    path.write_text(text if text else sample)
    # Relative paths (instructions, scripted rules) resolve next to the file.
    (tmp_path / "instructions").mkdir(exist_ok=True)
    for file in (SAMPLE_CONFIG.parent / "instructions").iterdir():
        (tmp_path / "instructions" / file.name).write_text(file.read_text())
    (tmp_path / "scripted.yaml").write_text((SAMPLE_CONFIG.parent / "scripted.yaml").read_text())
    for name in ("tools.py", "shop.sql"):
        (tmp_path / name).write_text((SAMPLE_CONFIG.parent / name).read_text())
    return path


def _sample_with(old: str, new: str) -> str:
    text = SAMPLE_CONFIG.read_text()
    assert old in text
    return text.replace(old, new, 1)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_sample_config_loads() -> None:
    loaded = load_config(SAMPLE_CONFIG)
    assert loaded.agent_names == ["triage", "payments", "tech_support", "account_manager"]
    assert loaded.config.graph.entry == "triage"
    assert loaded.targets("tech_support") == ["account_manager"]
    assert "route" in loaded.instructions["triage"]
    assert loaded.tier("payments").model == "scripted/support"


def test_unknown_agent_in_graph(tmp_path: Path) -> None:
    text = _sample_with("payments: [account_manager]", "payments: [account_manager, billing]")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = _line_of(text, "payments: [account_manager, billing]")
    message = str(info.value)
    assert f"{path}:{line}: graph.edges.payments[1]: 'billing' is not an agent" in message
    assert "expected one of: account_manager, payments, tech_support, triage" in message
    assert info.value.line == line and info.value.field == "graph.edges.payments[1]"


def test_missing_entry_agent(tmp_path: Path) -> None:
    text = _sample_with("  entry: triage\n", "")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:{_line_of(text, 'graph:')}: graph.entry: is required but missing" in str(info.value)


def test_entry_is_not_an_agent(tmp_path: Path) -> None:
    text = _sample_with("entry: triage", "entry: triagee")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"graph\.entry: 'triagee' is not an agent"):
        load_config(path)


def test_bad_field_type_and_unknown_field(tmp_path: Path) -> None:
    text = _sample_with("min_confidence: 0.6", "min_confidence: lots\n  minconfidence: 1")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}:{_line_of(text, 'min_confidence: lots')}: graph.min_confidence:" in message
    assert "valid number" in message and "'lots'" in message
    assert (
        f"{path}:{_line_of(text, 'minconfidence: 1')}: graph.minconfidence: is not a known setting" in message
    )


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: 1\nagents: [unclosed\n")
    with pytest.raises(ConfigError, match=r"corral\.yaml:\d+: invalid YAML"):
        load_config(path)


def test_cli_rejects_bad_config_before_starting(tmp_path: Path) -> None:
    text = _sample_with("entry: triage", "entry: nobody")
    path = _write(tmp_path, text)
    result = subprocess.run(
        [sys.executable, "-m", "corral.supervisor", "supervisor", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{_line_of(text, 'entry: nobody')}: graph.entry: 'nobody' is not an agent" in (
        result.stderr.replace("\n", "")
    )


def test_up_rejects_bad_replicas_before_starting_anything(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral.supervisor",
            "up",
            "--replicas",
            "payments=0",
            "-c",
            str(SAMPLE_CONFIG),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--replicas 'payments=0': expected AGENT=N with N >= 1" in " ".join(result.stderr.split())
    assert not (tmp_path / ".corral").exists()


def test_direct_models_must_be_scripted(tmp_path: Path) -> None:
    text = _sample_with(
        "  fast:\n    model: scripted/support\n", "  fast:\n    model: openai/gpt-4o-mini\n    via: direct\n"
    )
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "models.fast.via"
    assert info.value.line == _line_of(text, "via: direct")
    assert "`direct` takes one scripted/<rules> model and no fallbacks" in str(info.value)


def test_tools_load_from_a_file_beside_the_config_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.supervisor.config._config import load_tools

    path = _write(tmp_path, "")
    monkeypatch.chdir("/")
    loaded = load_config(path)
    assert loaded.config.tools is not None
    assert loaded.config.tools.reference == str(tmp_path / "tools.py")
    tools = load_tools(loaded.config)
    assert "refund" in tools and type(tools["refund"]).__module__.startswith("corral_tools_tools_")
    # Loaded once: the same module (and classes) for every caller in the process.
    assert load_tools(loaded.config)["refund"] is tools["refund"]


def test_tools_name_a_path_or_a_module_not_both(tmp_path: Path) -> None:
    both = _sample_with("  path: tools.py\n", "  path: tools.py\n  module: my_team.tools\n")
    with pytest.raises(ConfigError, match=r"corral\.yaml:\d+: tools: .*`path` .* or `module`, one of them"):
        load_config(_write(tmp_path, both))


def test_a_missing_tools_file_names_the_field(tmp_path: Path) -> None:
    missing = _sample_with("  path: tools.py\n", "  path: nowhere.py\n")
    with pytest.raises(ConfigError, match=r"corral\.yaml:\d+: tools\.path: cannot import .*nowhere\.py"):
        load_config(_write(tmp_path, missing))
