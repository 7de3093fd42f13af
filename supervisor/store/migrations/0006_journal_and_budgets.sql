-- The step journal: every model response, by (conversation, step, index), written
-- before the agent acts on it. A redelivered step replays it instead of asking again.
CREATE TABLE step_journal (
    conversation   text NOT NULL,
    step           integer NOT NULL,
    idx            integer NOT NULL,
    agent          text NOT NULL,
    text           text NOT NULL,
    model          text NOT NULL DEFAULT '',
    input_tokens   integer NOT NULL DEFAULT 0,
    output_tokens  integer NOT NULL DEFAULT 0,
    cost_usd       double precision NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation, step, idx)
);

-- Spend, one ledger for every process: per conversation, and per agent per day.
CREATE TABLE conversation_spend (
    conversation  text PRIMARY KEY,
    model_calls   integer NOT NULL DEFAULT 0,
    tokens        bigint NOT NULL DEFAULT 0,
    cost_usd      double precision NOT NULL DEFAULT 0
);

CREATE TABLE agent_spend (
    agent     text NOT NULL,
    day       date NOT NULL,
    cost_usd  double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, day)
);

-- Loop breaker: the same tool with the same arguments in one conversation.
CREATE INDEX audit_log_repeats ON audit_log (conversation, action, arguments_digest);
