"""Files a command writes for the user (a report, a plan): checked before the work starts, so a path that
cannot be a file is one error line at once rather than after minutes of planning, and written through
a temporary file and a rename, so a reader never sees half a file and a failed write changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

from torchtitan_like.errors import ConfigError


def check_output_file(path: Path, name: str, *, example: str = "report.json") -> None:
    """Raise ConfigError unless `path` can be written as a file: it is no folder, no file stands where one
    of its folders would be, and the nearest existing folder is writable. `name` is how the user gave it
    (`--json out.json`, `DRY_RUN_JSON=out.json`)."""
    if path.is_dir():
        raise ConfigError(f"{name} is a folder: name the file to write, e.g. {path / example}")
    for folder in path.parents:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise ConfigError(f"{name}: {folder} is a file, not a folder: choose a path whose folders are "
                                  "folders or do not exist yet")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(f"{name}: {folder} is not writable by this user: choose a path this user can write")
            return


def write_text_atomically(path: Path, text: str, name: str, *, example: str = "report.json") -> None:
    """Write `text` to `path` through a temporary file beside it and a rename, creating the folders: a reader
    never sees half a file, and a failed write leaves neither the temporary file nor a changed `path`.
    Raises ConfigError (one line naming `name`) when it cannot."""
    check_output_file(path, name, example=example)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise ConfigError(f"{name}: cannot write it ({e.strerror or e}): choose a path this user can write") from None
