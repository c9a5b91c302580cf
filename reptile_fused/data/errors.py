"""The one error type every loader raises, so callers (the CLI) can report it without a traceback."""


class DatasetError(ValueError):
    """A dataset folder is missing, malformed, unreadable or too small for the request.

    The message always names the offending path and what was expected there.
    """
