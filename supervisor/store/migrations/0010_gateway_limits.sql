-- The gateway's own view of kill switches, final decisions for every idempotency key, and
-- the role tool statements run under.

-- One row per configured agent, written by `corral kill agent` / `corral revive agent`.
-- The gateway reads its caller's row FOR SHARE in the statement that takes the call's
-- locks: a kill's UPDATE waits for the calls in flight, and every later call sees it.
-- Rows are upserted for every configured agent when the gateway starts (an INSERT would
-- not wait for anyone).
CREATE TABLE agent_controls (
    agent      text PRIMARY KEY,
    killed_at  timestamptz,
    reason     text,
    by         text
);

-- Every decision on a key is final and answered from here: denials, refusals after the
-- turn check, stops and simulations too, with what the agent was told.
ALTER TABLE tool_ledger ADD COLUMN reason text NOT NULL DEFAULT '';
ALTER TABLE tool_ledger ADD COLUMN policy_ids text[] NOT NULL DEFAULT '{}';
ALTER TABLE tool_ledger ADD COLUMN approval_id text;
-- What the loop breaker counts by: the tool and the resource it touches.
ALTER TABLE tool_ledger ADD COLUMN resource_key text NOT NULL DEFAULT '';
CREATE INDEX tool_ledger_repeats ON tool_ledger (conversation, tool, resource_key);

-- Tool statements run under `SET LOCAL ROLE corral_tools`: it reaches only the schemas
-- the tools module declares (granted where its setup runs), never corral's tables.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'corral_tools') THEN
        CREATE ROLE corral_tools NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- roles are cluster-wide: another database's migration created it meanwhile
END
$$;
