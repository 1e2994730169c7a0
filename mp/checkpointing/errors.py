"""What goes wrong with a checkpoint, as exception types callers can catch."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, incomplete, or not for this model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file's bytes differ from what its manifest recorded (truncated, damaged);
    nothing was loaded."""
