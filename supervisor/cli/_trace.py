"""`corral trace CONV`: a conversation's trace from corral's span store, as a tree."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral.supervisor.cli._shared import (
    ConfigOption,
    ConversationArgument,
    JsonOption,
    UnknownIdError,
    _database,
    _load,
    _run,
    app,
    print_json,
    say,
)

if TYPE_CHECKING:
    from rich.text import Text
    from rich.tree import Tree

    from corral.supervisor.store._trace_report import SpanNode


@app.command()
def trace(
    conversation: ConversationArgument,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a conversation's trace as a tree: each turn, the supervisor's decisions, each
    agent's steps, model attempts (tier, tokens, cost, latency), tool calls (decision,
    policies) and handoffs (confidence, payload). An unknown id exits 2."""
    settings = _load(config, tools=False)

    async def _main() -> int:
        from corral.supervisor.store._trace_report import conversation_trace

        conn = await _database(settings)
        try:
            roots = await conversation_trace(conn, conversation)
            known = roots or await conn.fetchval("SELECT true FROM conversations WHERE id = $1", conversation)
        finally:
            await conn.close()
        if not known:
            raise UnknownIdError(f"no conversation {conversation!r}: `corral conversations` lists them")
        if as_json:
            print_json({"conversation": conversation, "spans": [root.document() for root in roots]})
        elif not roots:
            say(
                f"no spans stored for {conversation} (telemetry.store is off, or they are past "
                "telemetry.retention_hours)"
            )
        else:
            _print_tree(conversation, roots)
        return 0

    _run(_main())


def _print_tree(conversation: str, roots: list[SpanNode]) -> None:
    from rich.console import Console
    from rich.text import Text
    from rich.tree import Tree

    tree = Tree(Text(conversation, style="bold"))
    for root in roots:
        _add(tree, root)
    Console(highlight=False).print(tree)


def _add(tree: Tree, node: SpanNode) -> None:
    branch = tree.add(_label(node))
    for child in node.children:
        _add(branch, child)


def _label(node: SpanNode) -> Text:
    """What a span says, as text: whatever an agent put in its spans (names, attributes) is
    shown as it is, never read as rich's markup."""
    from rich.text import Text

    a: dict[str, Any] = node.attributes
    label = Text.assemble((node.name, "bold"), "  ", (f"{node.service} {node.duration_ms:.1f} ms", "dim"))
    parts: list[str] = []
    if node.name.startswith("invoke_workflow"):
        parts.append(f"{a.get('corral.event', '')} from {a.get('corral.client', '')}")
    elif node.name.startswith("supervisor.decide"):
        parts.append(f"→ {a.get('corral.decision', '')} {a.get('corral.next_agent', '')}".rstrip())
    elif node.name.startswith("chat "):
        attempt = f"attempt {a.get('corral.attempt', '')} {a.get('corral.outcome', '')}"
        parts.append(f"tier {a.get('corral.tier', '')} {attempt}")
        parts.append(_usage(a))
    elif node.name.startswith("invoke_agent"):
        parts.append(f"step {a.get('corral.step', '')} tier {a.get('corral.tier', '')}")
        parts.append(_usage(a))
        parts.append(str(a.get("corral.output", "")))
    elif "corral.handoff.target" in a:
        payload = a.get("corral.handoff.payload") or _listed(a.get("corral.handoff.payload_keys"))
        parts.append(f"confidence {_number(a.get('corral.confidence', 0), '.2f')}; payload {payload or '{}'}")
    elif node.name.startswith(("execute_tool", "policy")):
        parts.append(
            f"{a.get('corral.decision', '')} under {_listed(a.get('corral.policy_ids')) or 'no policy'}"
        )
        if a.get("corral.approval_id"):
            parts.append(f"approval {a['corral.approval_id']}")
        if a.get("corral.dry_run"):
            parts.append("dry run")
    for part in parts:
        if part:
            label.append("  ")
            label.append(part)
    if node.status == "error":
        label.append(f"  failed: {node.status_message}", style="red")
    return label


def _number(value: Any, spec: str) -> str:
    if isinstance(value, (int, float)):
        try:
            return format(value, spec)
        except (OverflowError, ValueError):  # an integer past what a float holds
            pass
    return str(value)


def _listed(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value or "")


def _usage(a: dict[str, Any]) -> str:
    tokens_in, tokens_out = a.get("gen_ai.usage.input_tokens", 0), a.get("gen_ai.usage.output_tokens", 0)
    return f"{tokens_in} in / {tokens_out} out tokens, ${_number(a.get('corral.cost_usd', 0), '.6f')}"
