-- The audit log: append-only, each record hash-chained to the one before it.
-- Rows are written only by supervisor._audit.append_audit, which sets every column explicitly
-- (id and created_at included) because the hash covers them; see that module for the encoding.
CREATE TABLE audit_log (
    id                bigserial PRIMARY KEY,
    created_at        timestamptz NOT NULL DEFAULT now(),
    agent             text NOT NULL,
    credential_id     text NOT NULL,
    on_behalf_of      text NOT NULL,
    conversation      text NOT NULL,
    action            text NOT NULL,
    arguments_digest  text NOT NULL,
    decision          text NOT NULL,
    policy_ids        text[] NOT NULL DEFAULT '{}',
    approval_id       text,
    outcome           text NOT NULL,
    detail            text NOT NULL DEFAULT '',
    -- UNIQUE prev_hash keeps the chain linear: two appenders that read the same head cannot
    -- both commit, whatever their isolation level.
    prev_hash         text NOT NULL UNIQUE CHECK (prev_hash ~ '^[0-9a-f]{64}$'),
    hash              text NOT NULL UNIQUE CHECK (hash ~ '^[0-9a-f]{64}$')
);

CREATE INDEX audit_log_by_conversation ON audit_log (conversation, id);

-- Statement-level, so it fires even when no row matches, and it also covers TRUNCATE (which
-- row-level triggers never see). The table owner can still disable it; the hash chain is what
-- exposes changes made that way (`corral audit verify`).
CREATE FUNCTION audit_log_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Audit records are never changed or removed; append a new record instead.';
END;
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_reject_change();
