"""The errors a user can cause. Each carries a one-line message that names the key, file or value, says
what was expected and, where possible, how to fix it; the command lines print it and exit with code 2."""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DataError", "VolumeError", "RunError", "CheckpointError", "TrainingError"]


class UserError(Exception):
    """A mistake in the input (config, files, folders, options), reported as one line.

    Under torchrun most are decided alike on every process (the config, the run folder, the checkpoint), and
    rank 0 alone reports them. ``rank_local`` marks those one process can meet alone (a volume it loads, its
    own loss): the process that meets one reports it, naming its rank.
    """

    rank_local = False

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError, ValueError):
    """A bad configuration value."""


class DataError(UserError, ValueError):
    """A bad data input (path or file).

    A DataLoader worker re-raises errors as ``DataError("Caught DataError in DataLoader worker ...
    Traceback ... DataError: <message>")``; the original one-line message is recovered from that text.
    """

    def __init__(self, message: object = "") -> None:
        text = str(message)
        if "Traceback (most recent call last)" in text:
            for line in reversed(text.strip().splitlines()):
                _, found, tail = line.partition("DataError: ")
                if found:
                    text = tail
                    break
        super().__init__(text)


class VolumeError(DataError):
    """A volume that fails while it is loaded or preprocessed (met by the process that loads it)."""

    rank_local = True


class RunError(UserError, ValueError):
    """The run folder or an output folder does not allow what was asked (an existing run without --resume,
    nothing to resume, a folder that is not empty, ...)."""


class CheckpointError(UserError, ValueError):
    """A missing, unreadable or mismatched checkpoint."""


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (non-finite loss, gradients or weights); the last good checkpoint is kept."""
