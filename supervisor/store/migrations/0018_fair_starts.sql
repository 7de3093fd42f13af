-- Fair starts: a client's conversations past its share of running ones wait as 'queued',
-- oldest first, until one of its running conversations leaves 'running'.
ALTER TABLE conversations DROP CONSTRAINT conversations_status_check;
ALTER TABLE conversations ADD CONSTRAINT conversations_status_check
    CHECK (status IN ('queued', 'running', 'waiting', 'awaiting_customer', 'replied', 'refused',
                      'escalated', 'failed', 'killed', 'closed'));
CREATE INDEX conversations_queued ON conversations (client, created_at) WHERE status = 'queued';
