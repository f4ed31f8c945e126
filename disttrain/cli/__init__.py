"""The ``disttrain`` command: run a config in this process, launch it on ranks, or inspect it."""
