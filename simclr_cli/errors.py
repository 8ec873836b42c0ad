"""The user-error classes, one per meaning, and the exit code they get.

Every one of them is a mistake the user can fix (a value, a file, a device): the CLI prints its message as
one line and exits with USER_ERROR_EXIT, never a traceback. Each message names the fix. Raise the class
that says what went wrong, not the one that happens to be caught: the CLI catches them all through
`UserError`. Nothing here imports anything else of the project, so every module may import it.
"""

from __future__ import annotations

from pathlib import Path

USER_ERROR_EXIT = 2  # the exit code of every user error, and what a rank exits with after printing one


class UserError(ValueError):
    """A mistake the user can fix; the message is one line naming the fix."""


class ConfigError(UserError):
    """A config file, `--set` override or flag value that cannot be used."""


class OptionError(UserError):
    """A command's option that does not fit what it was given (a head layer the file lacks, k < 1)."""


class DatasetError(UserError):
    """A dataset or image folder that is missing, damaged or not what the command needs."""


class ImageDecodeError(DatasetError):
    """One image file that could not be decoded; `path` and `reason` are kept for reports."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) when pickled across DataLoader workers
        return (type(self), (self.path, self.reason))


class BadImagesError(DatasetError):
    """Some images (files, or samples of tar shards) did not decode and --skip-bad was not given: embed and
    predict wrote nothing. `failures` lists (path or shard URL#KEY, reason)."""

    def __init__(self, failures: list[tuple[Path | str, str]], total: int) -> None:
        self.failures = failures
        super().__init__(f"{len(failures)} of {total} images could not be decoded (listed above); nothing was "
                         "written: fix or remove them, or pass --skip-bad to leave them out")


class CheckpointError(UserError):
    """A checkpoint or encoder file that cannot be read or used as asked."""


class OutputError(UserError):
    """A place the command was asked to write that it cannot write (a folder, a read-only path, a terminal)."""


class RuntimeSetupError(UserError):
    """A device or precision this machine cannot give."""


class LoggerError(UserError):
    """A live logger (train.loggers: TensorBoard, W&B, MLflow) that could not start; the message names the fix."""


class MissingExtraError(RuntimeSetupError):
    """An optional package a command needs is not installed; the message names the extra that installs it."""
