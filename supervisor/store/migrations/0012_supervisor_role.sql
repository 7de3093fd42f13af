-- The role the supervisor (and a separate gateway) connect as: corral_supervisor. It reads
-- and writes corral's tables, but reaches audit_log only to read it and, through
-- corral_audit_append (SECURITY DEFINER, owned by the owner, search_path pinned), to append.
-- Not being the table's owner, it cannot UPDATE, DELETE, TRUNCATE or ALTER it, nor disable
-- its trigger. corral_tools (NOLOGIN) is the role tool statements run under
-- (SET LOCAL ROLE corral_tools); the supervisor's role is a member of it.
--
-- Migrations run as the owner (the admin DSN: `corral up` does it before starting the
-- supervisor, `corral migrate` otherwise). Roles belong to the whole cluster: if the owner
-- may not create them, a superuser creates them first (the README has the SQL).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'corral_supervisor') THEN
        BEGIN
            CREATE ROLE corral_supervisor LOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database of this cluster created it just now
        END;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'corral_tools') THEN
        BEGIN
            CREATE ROLE corral_tools NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    IF NOT pg_has_role('corral_supervisor', 'corral_tools', 'MEMBER') THEN
        GRANT corral_tools TO corral_supervisor;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION '% may not create the roles corral_supervisor and corral_tools', current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'As a superuser: CREATE ROLE corral_supervisor LOGIN PASSWORD ''...''; '
                     'CREATE ROLE corral_tools NOLOGIN; GRANT corral_tools TO corral_supervisor; '
                     'then run `corral migrate` again.';
END;
$$;

DO $$
DECLARE
    s text := quote_ident(current_schema());
    append_fn text := 'corral_audit_append(text, text, text, text, text, text, text, text[], text, text, text, bytea, bytea, bytea)';
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %s TO corral_supervisor', s);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %s TO corral_supervisor', s);
    EXECUTE format('GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA %s TO corral_supervisor', s);
    -- Tables and sequences that later migrations create (as this same owner) get the same.
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %s'
                   ' GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO corral_supervisor', s);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %s'
                   ' GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO corral_supervisor', s);

    -- The audit log: read, and append through the function only.
    REVOKE ALL ON audit_log FROM PUBLIC;
    REVOKE ALL ON audit_log FROM corral_supervisor, corral_tools;
    GRANT SELECT ON audit_log TO corral_supervisor;
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM corral_supervisor',
                   pg_get_serial_sequence('audit_log', 'id'));
    REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON corral_migrations FROM corral_supervisor;

    -- The function runs as its owner; a pinned search_path (pg_temp last) so that nobody's
    -- objects are resolved in its place.
    EXECUTE 'ALTER FUNCTION ' || append_fn || ' SECURITY DEFINER';
    EXECUTE format('ALTER FUNCTION %s SET search_path = %s, pg_temp', append_fn, s);
    EXECUTE 'REVOKE ALL ON FUNCTION ' || append_fn || ' FROM PUBLIC';
    EXECUTE 'GRANT EXECUTE ON FUNCTION ' || append_fn || ' TO corral_supervisor';
    EXECUTE format('REVOKE ALL ON FUNCTION %s.audit_log_reject_change() FROM PUBLIC', s);
END;
$$;
