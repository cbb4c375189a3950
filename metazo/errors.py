"""The one error type a user can cause. The CLI prints its message as a single line."""


class MetazoError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class RunInterrupted(MetazoError):
    """A run stopped on SIGINT/SIGTERM after writing a checkpoint; ``--resume`` continues it."""
