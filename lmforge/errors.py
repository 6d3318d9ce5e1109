"""The one exception type for user mistakes.

Anything the user can fix (a missing file, a bad config key, a corrupt checkpoint)
raises `LmforgeError`; the CLI prints its message as one line and exits non-zero.
Programming errors keep raising their own exceptions with a traceback.
"""


class LmforgeError(Exception):
    """A problem with the user's input, files or configuration."""
