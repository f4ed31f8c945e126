"""The public API a user implements: ``Module`` (with ``ModelHooks``) and ``DataModule``."""
