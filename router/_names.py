"""The names of the tools that end an agent's step, shared by agents, the scripted model
and the text protocols."""

REPLY_TOOL = "reply"
"""The tool that ends a step with an answer to the customer."""

TRANSFER_PREFIX = "transfer_to_"


def transfer_tool(target: str) -> str:
    """The name of the tool that hands a conversation to ``target``."""
    return f"{TRANSFER_PREFIX}{target}"
