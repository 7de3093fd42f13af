-- corral's own span store (corral.bus.spans, written by the supervisor's SpanWriter): what
-- `corral trace` and the console read, with no collector. `service` is the identity whose
-- own spans subject carried the span, not what the span says of itself.
CREATE TABLE spans (
    trace_id        text NOT NULL,
    span_id         text NOT NULL,
    parent_id       text NOT NULL DEFAULT '',
    conversation    text NOT NULL DEFAULT '',
    name            text NOT NULL,
    kind            text NOT NULL DEFAULT 'internal',
    service         text NOT NULL,
    started_at      timestamptz NOT NULL,
    ended_at        timestamptz NOT NULL,
    status          text NOT NULL DEFAULT 'unset',
    status_message  text NOT NULL DEFAULT '',
    attributes      jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX spans_by_conversation ON spans (conversation, started_at);
CREATE INDEX spans_by_time ON spans (started_at);
