-- Optimistic concurrency: every save of a conversation bumps its version, and a save
-- applies only to the version its decision was made on (one statement, no row lock held
-- across round trips).
ALTER TABLE conversations ADD COLUMN version integer NOT NULL DEFAULT 0;
