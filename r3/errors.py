"""The one error type for what a user can fix: a bad flag value, file, data row, model directory or resume.

Scripts catch `UserError` in one place and print `error: <message>` as one line on stderr (exit 2), so
its message must name the thing (flag, file and line, directory) and the fix. Library modules subclass
it where a narrower name helps a caller (`r3.tasks.TaskDataError`, `r3.checkpoint.CheckpointError`).

It does not: cover bugs. Anything that is not the user's to fix stays an ordinary exception with its
traceback.
"""


class UserError(Exception):
    """Something the user can fix; printed as one line without a traceback."""
