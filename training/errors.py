"""The one exception type a user sees as `error: ...` (bad flags, missing data, bad files)."""


class TrainingError(Exception):
    """A problem the user can fix; the message is one line and says how."""
