"""The ``graytune`` command: one subcommand per file."""
