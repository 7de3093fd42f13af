-- API keys of the HTTP API (`corral api-key create`): only their SHA-256 digest is kept.
-- A key acts as its client (the conversations it starts are that client's), for one
-- customer if it names one, and may use the operator endpoints if it is an operator's.
CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    digest      text NOT NULL UNIQUE,
    client      text NOT NULL,
    customer    text,
    operator    boolean NOT NULL DEFAULT false,
    created_by  text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
