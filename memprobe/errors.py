"""One exception type for user-facing errors: the message names the problem and the fix."""


class MemprobeError(Exception):
    """Bad input or state that the user can fix; the CLI prints the message without a traceback."""
