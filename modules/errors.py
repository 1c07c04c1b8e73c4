"""The one exception type of ``modules/`` for checkpoints and model folders."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and tensor."""
