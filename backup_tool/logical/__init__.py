"""Logical backups and restores: pg_dump's schema archive plus per-table COPY streams,
full and incremental, restored whole or table by table, then validated."""
