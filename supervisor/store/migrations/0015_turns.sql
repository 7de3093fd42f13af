-- Conversations hold dialogue: a transcript of turns (the customer's messages, agents' and
-- operators' replies), and two more states: awaiting the customer's next message, and
-- closed (idle past conversation.idle_timeout_s).
ALTER TABLE conversations DROP CONSTRAINT conversations_status_check;
ALTER TABLE conversations ADD CONSTRAINT conversations_status_check
    CHECK (status IN ('running', 'waiting', 'awaiting_customer', 'replied', 'refused', 'escalated',
                      'failed', 'killed', 'closed'));
ALTER TABLE conversations ADD COLUMN turns jsonb NOT NULL DEFAULT '[]';
-- The idle sweep: conversations awaiting their customer, oldest first.
CREATE INDEX conversations_awaiting ON conversations (updated_at) WHERE status = 'awaiting_customer';
