"""User-facing errors: the CLI turns these into one line on stderr and exit status 2."""


class VitforgeError(Exception):
    """Bad input from the user (path, option, data, checkpoint). The message names the culprit."""


class ConfigError(VitforgeError):
    """A recipe or override that cannot be turned into a valid config."""


class DataError(VitforgeError):
    """A dataset path or its content is unusable."""


class CheckpointError(VitforgeError):
    """A checkpoint is missing, unreadable or belongs to a different model."""
