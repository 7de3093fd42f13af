"""The tool gateway: the tool contract (``_tools``), how bodies run (``_tool_body``,
``_tool_runner``, ``_tool_process``), Cedar policy, approvals and rollback."""
