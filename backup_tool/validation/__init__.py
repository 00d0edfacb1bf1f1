"""The verdict: the named checks that compare a restored database with what its backup
holds. A check fails naming the object; a check whose data the backup lacks is skipped, never
failed."""
