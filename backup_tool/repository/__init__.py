"""The repository: storage drivers (local directory, S3, client-side encryption), the
manifest format, the catalog of backups over it, the catalog index, the key guard, the WAL
archive's identity file and the backup record every planner uses.

Above this layer, code speaks of backups and manifests; below it, of keys and bytes."""
