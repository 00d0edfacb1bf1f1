"""Bounded-memory byte streams: child processes (pg_dump, pg_restore, psql), compression,
verified reads of stored objects, parallel workers and cancellation."""
