"""Configuration: the trainer's options, YAML run configs, and the ``disttrain`` command."""
