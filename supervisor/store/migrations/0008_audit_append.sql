-- One round trip per audit record: take the chain's lock, read its head, number and time
-- the record, hash it and insert it, all in the appender's transaction.
--
-- The caller (supervisor._audit.append_audit) sends the record's canonical JSON in three
-- pieces around the two items only the database knows: before "created_at", between it
-- and "id", and after "id". The hash is the one supervisor._audit.chain_hash computes:
-- sha256(prev_hash bytes || canonical record), so `corral audit verify` checks both alike.
CREATE FUNCTION corral_audit_append(
    p_agent text, p_credential_id text, p_on_behalf_of text, p_conversation text,
    p_action text, p_arguments_digest text, p_decision text, p_policy_ids text[],
    p_approval_id text, p_outcome text, p_detail text,
    p_before bytea, p_between bytea, p_after bytea
) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_prev text;
    v_id bigint;
    v_at timestamptz;
    v_hash text;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- A snapshot older than the lock would not see the head.
        RAISE EXCEPTION 'append_audit needs READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    -- Held until the transaction ends: appenders queue here, each linking to the record
    -- committed before it. Each statement below takes a fresh snapshot, after the lock.
    PERFORM pg_advisory_xact_lock(1635083380);  -- 0x61756474, "audt"
    SELECT hash INTO v_prev FROM audit_log ORDER BY id DESC LIMIT 1;
    v_prev := coalesce(v_prev, repeat('0', 64));
    v_id := nextval(pg_get_serial_sequence('audit_log', 'id'));
    v_at := clock_timestamp();
    v_hash := encode(sha256(
        decode(v_prev, 'hex') || p_before
        || convert_to('"created_at":"' || to_char(v_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US')
            || '+00:00"', 'UTF8')
        || p_between || convert_to('"id":' || v_id::text, 'UTF8') || p_after
    ), 'hex');
    INSERT INTO audit_log (id, created_at, agent, credential_id, on_behalf_of, conversation, action,
        arguments_digest, decision, policy_ids, approval_id, outcome, detail, prev_hash, hash)
    VALUES (v_id, v_at, p_agent, p_credential_id, p_on_behalf_of, p_conversation, p_action,
        p_arguments_digest, p_decision, p_policy_ids, p_approval_id, p_outcome, p_detail, v_prev, v_hash);
    RETURN v_id;
END;
$$;
