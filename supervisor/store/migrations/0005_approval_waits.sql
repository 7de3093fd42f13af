-- A conversation can wait, durably, for a human's decision on an approval.
ALTER TABLE conversations DROP CONSTRAINT conversations_status_check;
ALTER TABLE conversations ADD CONSTRAINT conversations_status_check
    CHECK (status IN ('running', 'waiting', 'replied', 'refused', 'escalated', 'failed', 'killed'));

-- The approval it waits on, and how often its current step was resumed (each resume
-- re-dispatches the step under new message ids).
ALTER TABLE conversations ADD COLUMN approval_id text;
ALTER TABLE conversations ADD COLUMN resume integer NOT NULL DEFAULT 0;
