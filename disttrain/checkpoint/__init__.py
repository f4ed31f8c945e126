"""Checkpoints: the format and safe reading, taking and restoring one, choosing where to
resume from."""
