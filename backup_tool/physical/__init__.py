"""Physical backups and point-in-time recovery: base backups, the WAL archive
(push, fetch, spool), timelines and coverage, PITR lay-out and recovery."""
