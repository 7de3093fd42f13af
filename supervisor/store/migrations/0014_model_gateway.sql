-- The model gateway journals every model answer itself: the native tool calls the model made,
-- the tier that was asked, and the confidence the answer claims (of its reply or transfer),
-- so a step's attempts on each tier are on record, and replayed, as they happened.
ALTER TABLE step_journal
    ADD COLUMN tool_calls  jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN tier        text NOT NULL DEFAULT '',
    ADD COLUMN confidence  double precision,
    ADD COLUMN attempts    jsonb NOT NULL DEFAULT '[]';
