"""Errors the CLI turns into one clear line and exit code 2 (usage) instead of a traceback."""


class UsageError(ValueError):
    """The user asked for something that cannot be done as asked; the message says what to do."""
