-- The human queue: an escalated conversation waits for an operator, who claims it for a
-- while (claim_ttl_s), answers its customer, hands it back to an agent or closes it. One
-- claim per conversation; a lapsed claim may be taken by anyone.
CREATE TABLE conversation_claims (
    conversation text PRIMARY KEY REFERENCES conversations (id),
    claimed_by   text NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
-- Operators' requests already acted on, by their id: a request sent again is one action.
CREATE TABLE operator_actions (
    id           text PRIMARY KEY,
    conversation text NOT NULL REFERENCES conversations (id),
    action       text NOT NULL,
    by           text NOT NULL,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_escalated ON conversations (updated_at) WHERE status = 'escalated';
