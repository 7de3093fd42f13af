-- The tool gateway: the exactly-once ledger and durable approvals.

-- A dry-run conversation is policy-checked and simulated; no tool has an effect.
ALTER TABLE conversations ADD COLUMN dry_run boolean NOT NULL DEFAULT false;

-- The first result of every tool call, by idempotency key (<conversation>:<step>:<index>).
-- Written in the same transaction as the call's effect: a retried call returns it.
CREATE TABLE tool_ledger (
    idempotency_key  text PRIMARY KEY,
    conversation     text NOT NULL,
    agent            text NOT NULL,
    tool             text NOT NULL,
    arguments        jsonb NOT NULL,
    status           text NOT NULL,
    result           jsonb NOT NULL,
    undo             text,
    rolled_back_at   timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX tool_ledger_by_conversation ON tool_ledger (conversation, created_at);

-- A human's (or a role's) decision on one exact action, identified by its hash.
CREATE TABLE approvals (
    id            text PRIMARY KEY,
    action_hash   text NOT NULL,
    conversation  text NOT NULL,
    customer      text NOT NULL,
    agent         text NOT NULL,
    tool          text NOT NULL,
    arguments     jsonb NOT NULL,
    approver      text NOT NULL,
    policy_ids    text[] NOT NULL DEFAULT '{}',
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'approved', 'denied', 'used')),
    decided_by    text,
    reason        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    decided_at    timestamptz,
    used_at       timestamptz
);

CREATE INDEX approvals_by_hash ON approvals (action_hash, status);
CREATE INDEX approvals_pending ON approvals (created_at) WHERE status = 'pending';
