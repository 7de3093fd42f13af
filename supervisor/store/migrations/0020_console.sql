-- The console (served by the API): one-time logins that `corral up` and `corral
-- console-login` print, each redeemed once for an operator's API key; and the indexes its
-- conversation list and handoff graph read by.
CREATE TABLE console_logins (
    digest      text PRIMARY KEY,
    operator    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX conversations_newest ON conversations (created_at DESC, id DESC);
CREATE INDEX conversation_steps_recent_edges ON conversation_steps (created_at) WHERE target IS NOT NULL;
-- Alerts as the supervisor raised them (also on corral.alerts): for the console and
-- `corral status`.
CREATE TABLE alerts (
    id            bigserial PRIMARY KEY,
    kind          text NOT NULL,
    agent         text NOT NULL DEFAULT '',
    conversation  text NOT NULL DEFAULT '',
    reason        text NOT NULL,
    action        text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alerts_recent ON alerts (created_at);
