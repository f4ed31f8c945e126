"""Where a run's bytes go: files written whole or not at all (temporary file, fsync, rename),
and replaced atomically, also by one of another kind (a file by a directory)."""
