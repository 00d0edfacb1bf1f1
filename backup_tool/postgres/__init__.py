"""Talking to PostgreSQL: connection parameters and client tools, the catalog inventory
a backup records and validation compares, cluster control for throwaway servers, and one module
per kind of object the logical backup carries beyond pg_dump's archive (roles, database-level
properties, large objects, materialized views, extensions, column order)."""
