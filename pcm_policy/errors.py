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


# Episodes of the datasets made for the shipped policies (data/<task>/README.md), for the regeneration hint.
SHIPPED_EPISODES = {"pusht": 500, "lift": 120, "can": 200}


def missing_dataset(path) -> DatasetError:
    """The error for a dataset path that does not exist; for a scripted-expert dataset (`<task>_expert.zarr` or
    `.hdf5`, e.g. PickPlaceCan's, which ships as its command only) it says how to regenerate it.

    Args:
        path: the missing file or directory.

    Returns:
        A DatasetError to raise.
    """
    import re
    from pathlib import Path

    p = Path(path)
    msg = f"{path}: no such file or directory"
    match = re.fullmatch(r"(\w+)_expert\.(hdf5|zarr)", p.name)
    if match:
        task = match[1]
        count = f"episodes={SHIPPED_EPISODES[task]} seed=0 " if task in SHIPPED_EPISODES else ""
        msg += (f" (regenerate it with the scripted expert: pcm collect task={task} {count}output_dir={p.parent}; "
                f"see data/{task}/README.md)")
    return DatasetError(msg)
