"""The supervisor proper: its pure decisions, the service that applies them, the output
desk, and the client side of a conversation."""
