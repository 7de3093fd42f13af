-- Conversations and the supervisor's decisions on them.
CREATE TABLE conversations (
    id            text PRIMARY KEY,
    customer      text NOT NULL DEFAULT '',
    text          text NOT NULL,
    status        text NOT NULL CHECK (status IN ('running', 'replied', 'refused', 'escalated', 'failed')),
    current_agent text NOT NULL,
    step          integer NOT NULL,
    path          jsonb NOT NULL DEFAULT '[]',
    reply         text,
    reason        text,
    traceparent   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX conversations_open ON conversations (status) WHERE status <> 'replied';

CREATE TABLE conversation_steps (
    id            bigserial PRIMARY KEY,
    conversation  text NOT NULL REFERENCES conversations (id),
    step          integer NOT NULL,
    agent         text NOT NULL,
    kind          text NOT NULL,
    target        text,
    confidence    double precision,
    detail        text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX conversation_steps_by_conversation ON conversation_steps (conversation, id);
