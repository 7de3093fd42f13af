"""The public surface of each package is pinned: changing it is a deliberate act."""

import types

import corral.agents as agents
import corral.router as router
import corral.supervisor as supervisor

BUS_EXPORTS = {
    "DEAD_REASON",
    "DEAD_STREAM_SEQ",
    "DEAD_SUBJECT",
    "DEAD_TRUNCATED",
    "DECODE_ERRORS",
    "ATTEMPT",
    "MSG_ID",
    "TRACEPARENT",
    "AgentEvent",
    "AgentFailed",
    "AgentInput",
    "AgentOutput",
    "AgentReply",
    "AgentTask",
    "AgentWaiting",
    "Alert",
    "MaxDeliveriesWatcher",
    "MessageService",
    "RequestService",
    "Requester",
    "Service",
    "ApprovalDecided",
    "Bus",
    "BusConfig",
    "BusConnectError",
    "BusError",
    "ClientUpdate",
    "ConnectionClosedError",
    "ConnectionGuard",
    "Consumer",
    "ConsumerConfig",
    "ConsumerState",
    "ControlState",
    "ControlWatcher",
    "KillSwitch",
    "KillTarget",
    "Limits",
    "PayloadTooLargeError",
    "check_payload",
    "is_retryable",
    "clip",
    "limit_problem",
    "output_problem",
    "start_problem",
    "payload_size",
    "request",
    "Serving",
    "serve_together",
    "clear_kill",
    "ensure_control_bucket",
    "list_kills",
    "set_kill",
    "serve_with_control",
    "ConversationEnded",
    "ConversationRecorded",
    "ConversationStart",
    "ConversationStatus",
    "ConversationWaiting",
    "CorralError",
    "Delivery",
    "HandoffForwarded",
    "HandoffProposed",
    "HandoffRefused",
    "Hop",
    "JournalEntry",
    "JournalQuery",
    "JournalReply",
    "JournalRequest",
    "Message",
    "OutputTaken",
    "PoisonMessageError",
    "StepEvent",
    "SwitchRequest",
    "SupervisorInput",
    "ToolCall",
    "ToolDecided",
    "ToolResult",
    "ToolStatus",
    "TopologyConfig",
    "agent_consumer_config",
    "connect",
    "current_traceparent",
    "dead_letter",
    "encode",
    "ensure_topology",
    "new_traceparent",
    "publish",
    "publish_live",
    "subjects",
    "supervisor_consumer_config",
    "trace_id",
    "traceparent_from",
    "use_traceparent",
    "server_has_seen",
    "Attempt",
    "MAX_TOKENS_PER_RESPONSE",
    "MAX_USD_PER_RESPONSE",
    "ChatRole",
    "ChatToolCall",
    "ChatTurn",
    "ModelAnswer",
    "ModelCall",
    "ModelStatus",
    "ToolSpec",
    "ConversationAwaiting",
    "CustomerMessage",
    "MessageRefused",
    "Turn",
    "message_problem",
    "OperatorAction",
    "ApprovalsQuery",
    "ApprovalsView",
    "ConsoleQuery",
    "ConsoleView",
    "LoginGranted",
    "LoginRedeem",
    "ApprovalVerdict",
    "OperatorInput",
    "OperatorAnswer",
    "OperatorRequest",
    "ApiAnswer",
    "ApiRequest",
    "ConversationQuery",
    "ConversationView",
    "KeyCheck",
    "KeyInfo",
    "PendingApproval",
    "QueueQuery",
    "QueueView",
}


def test_bus_exports() -> None:
    import corral.bus as bus

    assert set(bus.__all__) == BUS_EXPORTS
    # Every wire type is exported.
    typing_names = {"Annotated", "Any", "Literal"}
    assert {n for n in dir(bus._messages) if n[0].isupper()} <= set(bus.__all__) | typing_names
    assert {n for n in dir(bus._model_messages) if n[0].isupper()} <= set(bus.__all__) | typing_names


def test_agents_exports() -> None:
    assert set(agents.__all__) == {
        "AgentError",
        "AgentService",
        "AgentSettings",
        "AgentState",
        "DecisionError",
        "HandoffEdge",
        "Reply",
        "ToolUse",
        "Transfer",
        "Turn",
        "offered_tools",
        "read_turn",
    }


def test_router_exports() -> None:
    assert set(router.__all__) == {
        "REPLY_TOOL",
        "SCRIPTED_PROVIDER",
        "Admission",
        "Ledger",
        "ModelGateway",
        "ModelPrice",
        "ToolProtocol",
        "transfer_tool",
        "Completion",
        "CompletionRequest",
        "LiteLLMModel",
        "Model",
        "ModelTier",
        "RouterError",
        "ScriptError",
        "ScriptRule",
        "ScriptRules",
        "ScriptedModel",
        "load_rules",
        "model_for_tier",
        "register_scripted",
    }


def test_supervisor_exports() -> None:
    """Every name of ``__all__`` loads, and once all are loaded they are exactly the
    package's public names (its sub-packages aside)."""
    for name in supervisor.__all__:
        assert hasattr(supervisor, name)
    public = {
        name
        for name, value in vars(supervisor).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(supervisor.__all__)
    assert supervisor.__all__ == sorted(supervisor.__all__)
