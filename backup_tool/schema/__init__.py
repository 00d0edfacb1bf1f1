"""Schema history: migrations, drift between a live database and its backup, and rebuilding
a database from a backup's schema plus newer migrations."""
