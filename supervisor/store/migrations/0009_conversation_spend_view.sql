-- A conversation's spend is the sum of its journaled responses: read it from the journal
-- instead of updating a row on every response (the journal already holds every figure,
-- and a replayed response is journaled once, so it is counted once). Same name, same
-- columns, for whoever reads it.
DROP TABLE conversation_spend;

CREATE VIEW conversation_spend AS
SELECT conversation,
       count(*)::integer AS model_calls,
       sum(input_tokens + output_tokens)::bigint AS tokens,
       sum(cost_usd) AS cost_usd
FROM step_journal
GROUP BY conversation;
