"""Pure planners: given (backups, policy, now) they decide (what retention deletes, what
is due, whether a promise is met, what the status and the audit say), and give reasons.
No storage, no clock, no PostgreSQL."""
