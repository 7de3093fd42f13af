-- Alerts as the keeper stores them from corral.alerts: each once (its sequence in
-- CORRAL_EVENTS), with the model it is about (a retry storm).
ALTER TABLE alerts
    ADD COLUMN stream_seq  bigint UNIQUE,
    ADD COLUMN model       text NOT NULL DEFAULT '';
