"""One exception type for mistakes a user can fix.

A `CuraError` carries one sentence that says what is wrong, where (file:line or config key) and how to fix
it. The CLI prints it without a traceback and exits non-zero; anything else that escapes is a bug and keeps
its traceback.
"""


class CuraError(Exception):
    """A user-facing error: bad input, bad configuration, a missing file. Never a bug."""
