-- Tools that declare their SQL (corral.SqlTool): each statement is installed as a function in
-- the schema corral_sql, SECURITY DEFINER and owned by corral_tool_statements (NOLOGIN), a
-- member of corral_tools: whichever of the gateway's statements calls it, it runs with the
-- tools' privileges, so the gateway can send a call's facts and effect inside its own
-- statements (a call in 4 round trips) and the tools still reach nothing of corral's.
-- corral_tools is not a member of corral_tool_statements: a tool's statement cannot alter
-- these functions (nor make one run as its caller). Only the owner creates them
-- (`corral up` / `corral migrate`, with the team's tools).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'corral_tool_statements') THEN
        BEGIN
            CREATE ROLE corral_tool_statements NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database of this cluster created it just now
        END;
    END IF;
    IF NOT pg_has_role('corral_tool_statements', 'corral_tools', 'MEMBER') THEN
        GRANT corral_tools TO corral_tool_statements;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION '% may not create the role corral_tool_statements', current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'As a superuser: CREATE ROLE corral_tool_statements NOLOGIN; '
                     'GRANT corral_tools TO corral_tool_statements; then run `corral migrate` again.';
END;
$$;

CREATE SCHEMA IF NOT EXISTS corral_sql;
REVOKE ALL ON SCHEMA corral_sql FROM PUBLIC;
GRANT USAGE ON SCHEMA corral_sql TO corral_supervisor;
-- (CREATE: a function's new owner must be able to create it where it is; nobody logs in as it.)
GRANT USAGE, CREATE ON SCHEMA corral_sql TO corral_tool_statements;
