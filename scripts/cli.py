"""What every subcommand shares: the user-facing error type (printed as one line, exit 2)."""


class CliError(Exception):
    """A user mistake or an environment problem; the message says how to fix it."""
