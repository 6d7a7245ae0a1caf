"""The error every unreadable, corrupt or hostile checkpoint file gives."""


class CheckpointError(ValueError):
    """A path that is not a readable TF checkpoint (missing, not one, truncated, corrupt).

    The message names the file and what is wrong with it.
    """
