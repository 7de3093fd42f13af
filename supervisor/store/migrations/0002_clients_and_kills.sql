-- Conversations belong to a client identity; they can be killed; dropped messages are kept.
ALTER TABLE conversations ADD COLUMN client text NOT NULL DEFAULT 'client';

ALTER TABLE conversations DROP CONSTRAINT conversations_status_check;
ALTER TABLE conversations ADD CONSTRAINT conversations_status_check
    CHECK (status IN ('running', 'replied', 'refused', 'escalated', 'failed', 'killed'));

CREATE INDEX conversations_waiting_on ON conversations (current_agent) WHERE status = 'running';

-- Messages the supervisor did not act on because their conversation or agent was killed.
CREATE TABLE dropped_messages (
    id            bigserial PRIMARY KEY,
    conversation  text NOT NULL,
    agent         text NOT NULL,
    step          integer NOT NULL,
    kind          text NOT NULL,
    reason        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dropped_messages_by_conversation ON dropped_messages (conversation, id);
