"""The audit chain: hash-chained records in PostgreSQL, signed anchors on JetStream, and
checking one against the other."""
