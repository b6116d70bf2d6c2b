"""User-facing errors: `pcm_policy.cli.main` prints them as one line on stderr and exits with status 2, without a
traceback."""


class PcmError(Exception):
    """A problem with the user's input (file, config key, checkpoint, device) described in one line.

    The message should name the offending file or key and say what is wrong with it.
    """


class DatasetError(PcmError):
    """A dataset file is missing, corrupt or inconsistent."""


class ConfigError(PcmError):
    """A config key is unknown or has an invalid value."""


class CheckpointError(PcmError):
    """A checkpoint is missing, corrupt or does not match the requested config."""

