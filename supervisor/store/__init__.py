"""corral's state in PostgreSQL: conversations, group commit, the step journal, budgets,
kill rows, the database roles and the migrations."""
