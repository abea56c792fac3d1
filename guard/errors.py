"""One exception type for every problem a user can fix.

The CLI prints a `GuardError` as a single line (no traceback): the message must name the file, key or value
at fault and what was expected. Anything else that escapes is a bug and keeps its traceback.
"""


class GuardError(Exception):
    """A user-facing error: bad config, bad input file, incompatible artifact, missing prerequisite."""
