"""Errors shown to the user as one line (the CLI prints them without a traceback)."""


class SemisegError(Exception):
    """Base of every user-facing error: the message names the file, line or key at fault."""


class DataError(SemisegError, ValueError):
    """Bad dataset input: missing or unreadable file, size mismatch, label out of range, empty split."""


class CheckpointError(SemisegError, ValueError):
    """A checkpoint or weight file that cannot be loaded (wrong keys, wrong shapes, unsafe content)."""


class TrainingError(SemisegError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
