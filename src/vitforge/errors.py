"""User-facing errors: the CLI turns these into one line on stderr and exit status 2."""


class VitforgeError(Exception):
    """Bad input from the user (path, option, data, checkpoint). The message names the culprit."""


class ConfigError(VitforgeError):
    """A recipe or override that cannot be turned into a valid config."""


class DataError(VitforgeError):
    """A dataset path or its content is unusable."""


class CheckpointError(VitforgeError):
    """A checkpoint is missing, unreadable or belongs to a different model."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), at most `limit` chars:
    what a one-line error quotes from a library exception."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]
