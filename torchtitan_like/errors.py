"""User-facing errors. `train.py` prints them as one line and exits non-zero, with no traceback.

Everything else (a bug, an internal invariant) keeps its traceback.
"""

import errno

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
"""The OSError errnos of a write that found the disk or the quota full (train.py's advice, checkpoint.py's note)."""


class TrainerError(Exception):
    """An error the user can fix: the message names the cause and the fix."""


class ConfigError(TrainerError):
    """A config file, key or value that cannot run (names the key, the value, the rule and the fix)."""


class DataError(TrainerError):
    """A dataset or tokenizer problem (names the file and, where it applies, the line)."""


class TrainingError(TrainerError):
    """Training cannot go on (a NaN loss, say): names the step."""
